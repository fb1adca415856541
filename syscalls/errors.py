"""Errno-style errors of the syscall ABI.

Every refusal the kernel sends is one of these names with its Linux number and a human
message. ``SyscallError`` is what clients raise; the kernel raises it inside handlers and the
dispatcher turns it into an error reply.
"""
from __future__ import annotations

import errno as _errno

# name -> (code, meaning). Codes are the Linux values, so a C client can use <errno.h>.
ERRNOS: dict[str, tuple[int, str]] = {
    "EPERM": (_errno.EPERM, "operation not permitted (missing capability)"),
    "ENOENT": (_errno.ENOENT, "no such model, file or object"),
    "ESRCH": (_errno.ESRCH, "no such process (or not yours)"),
    "EIO": (_errno.EIO, "internal error while serving the call; the kernel keeps running"),
    "E2BIG": (_errno.E2BIG, "argument or prompt too large"),
    "EAGAIN": (_errno.EAGAIN, "try again: quota, rate limit or service temporarily down"),
    "ENOMEM": (_errno.ENOMEM, "not enough memory (KV blocks or weights) even after eviction"),
    "EACCES": (_errno.EACCES, "access denied: a missing or bad token, or an object not shared with you"),
    "EBUSY": (_errno.EBUSY, "object busy or in the wrong state for this call"),
    "EEXIST": (_errno.EEXIST, "already exists"),
    "ENOTDIR": (_errno.ENOTDIR, "a component of the path is a file, not a directory"),
    "EISDIR": (_errno.EISDIR, "the path is a directory"),
    "EINVAL": (_errno.EINVAL, "invalid argument"),
    "ENOSYS": (_errno.ENOSYS, "unknown syscall"),
    "EPROTO": (_errno.EPROTO, "protocol error: malformed envelope or wrong ABI version"),
    "EMSGSIZE": (_errno.EMSGSIZE, "message larger than the frame limit"),
    "ECONNREFUSED": (_errno.ECONNREFUSED, "no kernel listening (client side)"),
    "ECONNRESET": (_errno.ECONNRESET, "the kernel restarted while the call was pending (client side)"),
    "ETIMEDOUT": (_errno.ETIMEDOUT, "no reply in time"),
    "EDQUOT": (_errno.EDQUOT, "storage quota exceeded"),
    "ECANCELED": (_errno.ECANCELED, "operation cancelled"),
    "ENOTSUP": (_errno.ENOTSUP, "not supported here (e.g. a cluster call made to a plain kernel)"),
    "EXDEV": (_errno.EXDEV, "the object lives on another node of the cluster"),
    "EHOSTDOWN": (_errno.EHOSTDOWN, "the kernel that held the process is gone and it could not be restored"),
}


class SyscallError(Exception):
    """A syscall failed. ``.errno`` is the name (``"EINVAL"``), ``.code`` its number."""

    def __init__(self, errno: str, message: str = ""):
        if errno not in ERRNOS:
            message = f"{errno}: {message}"
            errno = "EIO"
        self.errno = errno
        self.code = ERRNOS[errno][0]
        self.message = message or ERRNOS[errno][1]
        super().__init__(f"[{errno}] {self.message}")

    def to_wire(self) -> dict:
        return {"errno": self.errno, "code": self.code, "message": self.message}

    @classmethod
    def from_wire(cls, err: object) -> "SyscallError":
        if not isinstance(err, dict):
            return cls("EPROTO", f"malformed error object: {err!r}")
        return cls(str(err.get("errno", "EIO")), str(err.get("message", "")))
