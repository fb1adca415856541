"""A streaming write: chunks go to a temp file as they come; the file changes only at commit."""
from __future__ import annotations

from typing import TYPE_CHECKING

from llmos.services.fs.blobs import TempBlob
from llmos.services.fs.errors import FsError

if TYPE_CHECKING:
    from llmos.services.fs.store import FileStore


class Writer:
    """A streaming write to one file. Nothing is visible until ``commit()``; ``abort()`` (or an
    exception inside ``with``) leaves the file as it was. Memory use is one chunk."""

    def __init__(self, store: "FileStore", uid: int, path: str, overwrite: bool, budget: int):
        self.store, self.uid, self.path, self.overwrite = store, uid, path, overwrite
        self.budget = budget             # bytes this file may hold under the quota seen at open
        self.tmp: TempBlob | None = store.blobs.new_temp()

    @property
    def size(self) -> int:
        return self.tmp.size if self.tmp else 0

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self.tmp is None:
            raise FsError("EINVAL", "write to a writer that was committed or aborted")
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            self.abort()
            raise FsError("EINVAL", f"data must be bytes, not {type(chunk).__name__}")
        if self.tmp.size + memoryview(chunk).nbytes > self.budget:
            self.abort()
            raise FsError("EDQUOT", f"writing {self.path!r} would exceed uid {self.uid}'s quota")
        self.tmp.write(chunk)

    def commit(self) -> dict:
        """Make the new content the file's, durably; return its stat."""
        if self.tmp is None:
            raise FsError("EINVAL", "commit of a writer that was committed or aborted")
        tmp, self.tmp = self.tmp, None
        return self.store._commit(self.uid, self.path, self.overwrite, tmp)

    def abort(self) -> None:
        if self.tmp is not None:
            tmp, self.tmp = self.tmp, None
            self.store._forget(tmp)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.tmp is not None:
            self.commit()
        else:
            self.abort()
