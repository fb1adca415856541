"""Blob files: content stored once, named by its SHA-256, made durable before anyone points at it.

Layout under the store root::

    blobs/<sha[:2]>/<sha>   immutable content; written once, never modified, unlinked when unreferenced
    tmp/<random>            a write in progress; anything here at open time is debris of a crash

Promise: ``TempBlob.finish()`` returns only after the content is fsynced, and ``install()``
returns only after the rename into ``blobs/`` and the fsync of the directory holding the new
name. So a name under ``blobs/`` always holds complete content, and a blob the index refers to
survives a crash of the process (or of the machine).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from llmos.services.durable import fsync_dir

SHA_RE = re.compile(r"[0-9a-f]{64}")


class TempBlob:
    """Content being written: hashed as it arrives, appended to a temp file, never held whole."""

    def __init__(self, tmp_dir: Path):
        self.path = tmp_dir / f"w-{os.getpid()}-{os.urandom(8).hex()}"
        self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        self.hasher.update(view)
        self.size += view.nbytes
        while view:
            view = view[os.write(self.fd, view):]

    def finish(self) -> str:
        """fsync and close the temp file; return the content's hex SHA-256."""
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        return self.hasher.hexdigest()

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class BlobDir:
    """The ``blobs/`` and ``tmp/`` directories of one store root."""

    def __init__(self, root: Path):
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        for d in (self.blob_dir, self.tmp_dir):
            if not d.is_dir():
                d.mkdir(mode=0o700)
                fsync_dir(root)

    def path(self, sha: str) -> Path:
        return self.blob_dir / sha[:2] / sha

    def new_temp(self) -> TempBlob:
        return TempBlob(self.tmp_dir)

    def install(self, tmp: TempBlob, sha: str) -> None:
        """Make the finished ``tmp`` the blob ``sha``, durably. If that blob file is already
        there (referenced, or an orphan of a crash) its content is identical: keep it, drop tmp,
        and fsync it and its directory anyway, since an orphan's name may not be durable yet."""
        dst = self.path(sha)
        shard = dst.parent
        if not shard.is_dir():
            shard.mkdir(mode=0o700, exist_ok=True)
            fsync_dir(self.blob_dir)
        if dst.exists():
            tmp.discard()
            fd = os.open(dst, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            os.rename(tmp.path, dst)
        fsync_dir(shard)

    def open(self, sha: str) -> int:
        """A read-only fd on blob ``sha``; it stays readable even if the blob is unlinked later."""
        return os.open(self.path(sha), os.O_RDONLY | os.O_CLOEXEC)

    def remove(self, sha: str) -> None:
        """Unlink an unreferenced blob. Not fsynced: if the unlink is lost, gc() finds an orphan."""
        try:
            os.unlink(self.path(sha))
        except FileNotFoundError:
            pass

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def hash_of(self, sha: str, chunk: int = 1 << 20) -> str:
        h = hashlib.sha256()
        with open(self.path(sha), "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()

    def all_files(self) -> list[Path]:
        """Every file in the shards under ``blobs/``, hash-named or not."""
        return [f for shard in self.blob_dir.iterdir() if shard.is_dir() for f in shard.iterdir()]

    def is_blob_path(self, f: Path) -> bool:
        """Whether ``f`` is where the blob named like it belongs (a hash, in its own shard)."""
        return bool(SHA_RE.fullmatch(f.name)) and f == self.path(f.name)

    def clear_tmp(self) -> int:
        """Delete writes in progress; only safe while no writer is open (at open time)."""
        num = 0
        for f in self.tmp_dir.iterdir():
            f.unlink()
            num += 1
        return num
