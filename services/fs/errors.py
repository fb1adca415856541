"""The one exception the file store raises, carrying an ABI errno name.

The service turns it into a reply with ``SyscallError(e.errno, e.message)``. ``ENOTDIR`` and
``EISDIR`` are not yet in ``llmos.syscalls.errors.ERRNOS``; until they are, the ABI reports them
as ``EIO`` with the name in the message.
"""
from __future__ import annotations

FS_ERRNOS = frozenset({
    "ENOENT",   # no such file (or the owner's namespace has none at that path)
    "EACCES",   # another user's file that is not shared with the caller, or a write to it
    "EEXIST",   # target exists and overwrite=False
    "EINVAL",   # bad path, uid, offset, data type, quota value
    "EDQUOT",   # the write would take the owner past their quota
    "ENOTDIR",  # a parent component of the path is a file
    "EISDIR",   # the path names a directory (a prefix of other files), not a file
    "EBUSY",    # the store's root is open in another process
})


class FsError(Exception):
    """A refused file-store call. ``.errno`` is an ABI name, ``.message`` says why."""

    def __init__(self, errno: str, message: str):
        assert errno in FS_ERRNOS, errno
        self.errno = errno
        self.message = message
        super().__init__(f"[{errno}] {message}")
