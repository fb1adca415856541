"""The file store: per-user namespaces of content-addressed, atomically and durably written files.

On disk, under ``root``::

    LOCK                    flock'ed by the one process that has the store open (else EBUSY)
    index.sqlite3 (+ -wal)  metadata: files, blob reference counts, shares, quotas (index.py)
    blobs/<sha[:2]>/<sha>   content, once per distinct content however many files name it
    tmp/                    writes in progress (blobs.py)

Addressing another user's files: every call takes ``uid`` (the caller, as verified by the
kernel) and an optional ``owner=`` (whose namespace; default the caller). Reads (read, iter_read,
get, stat, list) of ``owner != uid`` need a share from owner to uid covering the path, else
EACCES, whether or not the file exists, so unshared names do not leak. Writes (put,
open_write, rm, mv) with ``owner != uid`` are always EACCES: shares grant read only.

Durability. A write (1) streams into ``tmp/`` and fsyncs it, (2) under the store lock opens an
index transaction, checks quota and target, (3) renames the temp file to
``blobs/<sha[:2]>/<sha>`` and fsyncs that directory, (4) points the file row at the blob and
moves the reference counts, (5) commits (WAL fsynced, synchronous=FULL) and only then returns,
(6) unlinks any blob whose count reached zero. A blob name therefore only ever holds complete
content; the index references a blob only after the blob is durable; and a blob file
disappears only after the commit that dropped its last reference. A SIGKILL at any point leaves
the index at the old or the new version (SQLite's atomic commit), pointing at a complete blob,
so a file is never torn; what it can leave is a temp file or an unreferenced blob, which
``gc()`` (run at open) deletes. Quota: a user's usage is the sum of the sizes of their files;
content shared with other users, or repeated in one namespace, counts for each file.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from llmos.services.fs.blobs import BlobDir, TempBlob
from llmos.services.fs.errors import FsError
from llmos.services.fs.index import FileRow, Index
from llmos.services.fs.paths import covers, normpath
from llmos.services.fs.writer import Writer


MAX_INT = (1 << 63) - 1     # SQLite's INTEGER


def _check_uid(uid: object, what: str = "uid") -> int:
    if not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid <= MAX_INT:
        raise FsError("EINVAL", f"{what} must be a non-negative int, not {uid!r}")
    return uid


def _check_count(n: object, what: str, *, positive: bool = False) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not (1 if positive else 0) <= n <= MAX_INT:
        raise FsError("EINVAL", f"{what} must be an int >= {1 if positive else 0}, not {n!r}")
    return n


def _stat(row: FileRow) -> dict:
    return {"path": row.path, "size": row.size, "sha256": row.sha256, "mtime": row.mtime, "owner": row.uid}


class FileStore:
    def __init__(self, root: Path | str, default_quota_bytes: int = 1 << 30):
        self.root = Path(root)
        self.default_quota_bytes = _check_count(default_quota_bytes, "default_quota_bytes")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise FsError("EBUSY", f"file store {self.root} is open in another process") from None
        self._lock = threading.RLock()   # serialises index transactions and blob installs/unlinks
        self._temps: set[Path] = set()   # temp files of open writers, which gc() must spare
        self.blobs = BlobDir(self.root)
        self.index = Index(self.root / "index.sqlite3")
        self.gc_at_open = self.gc()      # what the last crash left behind, for logs and tests

    def close(self) -> None:
        with self._lock:
            if self._lock_fd >= 0:
                self.index.close()
                os.close(self._lock_fd)      # releases the flock
                self._lock_fd = -1

    def __enter__(self) -> "FileStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- writing -----
    def put(self, uid: int, path: str, data: bytes, overwrite: bool = True, *, owner: int | None = None) -> dict:
        """Write ``data`` as the whole new content of ``path``; return its stat."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise FsError("EINVAL", f"data must be bytes, not {type(data).__name__}")
        w = self.open_write(uid, path, overwrite, owner=owner)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        return w.commit()

    def open_write(self, uid: int, path: str, overwrite: bool = True, *, owner: int | None = None) -> Writer:
        """Start a streaming write; target, overwrite and quota are checked now and at commit."""
        uid, path = self._writable(uid, path, owner)
        with self._lock:
            old = self._check_target(uid, path, overwrite)
            budget = self._quota(uid) - (self.index.usage(uid) - (old.size if old else 0))
            w = Writer(self, uid, path, overwrite, max(budget, old.size if old else 0))
            self._temps.add(w.tmp.path)
        return w

    def _commit(self, uid: int, path: str, overwrite: bool, tmp: TempBlob) -> dict:
        try:
            sha = tmp.finish()                   # the slow fsync happens outside the lock
        except BaseException:
            self._forget(tmp)
            raise
        row = FileRow(uid, path, sha, tmp.size, time.time())
        with self._lock:
            self._temps.discard(tmp.path)
            try:
                with self.index.tx():
                    old = self._check_target(uid, path, overwrite)
                    old_size = old.size if old else 0
                    if row.size > old_size and self.index.usage(uid) - old_size + row.size > self._quota(uid):
                        raise FsError("EDQUOT", f"writing {path!r} would exceed uid {uid}'s quota")
                    self.blobs.install(tmp, sha)       # durable before the index can name it
                    freed = self.index.put_file(row)
            except BaseException:
                tmp.discard()
                if self.index.refs(sha) == 0:
                    self.blobs.remove(sha)             # installed, then rolled back: not needed
                raise
            if freed:
                self.blobs.remove(freed)
        return _stat(row)

    def _forget(self, tmp: TempBlob) -> None:
        with self._lock:
            self._temps.discard(tmp.path)
        tmp.discard()

    def rm(self, uid: int, path: str, *, owner: int | None = None) -> None:
        uid, path = self._writable(uid, path, owner)
        with self._lock:
            with self.index.tx():
                self._file_row(uid, path)
                freed = self.index.delete_file(uid, path)
            if freed:
                self.blobs.remove(freed)

    def mv(self, uid: int, src: str, dst: str, overwrite: bool = False, *, owner: int | None = None) -> dict:
        """Rename a file (not a directory); the content and mtime move with it, no data is copied."""
        uid, src = self._writable(uid, src, owner)
        dst = normpath(dst)
        with self._lock:
            freed = None
            with self.index.tx():
                row = self._file_row(uid, src)
                if dst != src:
                    old = self._check_target(uid, dst, overwrite)
                    if old:
                        freed = self.index.delete_file(uid, dst)
                    self.index.rename_file(uid, src, dst)
            if freed:
                self.blobs.remove(freed)
        return _stat(FileRow(uid, dst, row.sha256, row.size, row.mtime))

    # ----- reading -----
    def read(self, uid: int, path: str, offset: int = 0, length: int | None = None, *,
             owner: int | None = None) -> bytes:
        """Up to ``length`` bytes from ``offset`` (to the end if None); short only at the end."""
        _check_count(offset, "offset")
        if length is not None:
            _check_count(length, "length")
        row, fd = self._open_blob(uid, path, owner)
        try:
            todo = max(0, row.size - offset) if length is None else max(0, min(length, row.size - offset))
            parts = []
            while todo > 0:
                part = os.pread(fd, min(todo, 1 << 30), offset)
                if not part:
                    break
                parts.append(part)
                offset += len(part)
                todo -= len(part)
            return b"".join(parts)
        finally:
            os.close(fd)

    def get(self, uid: int, path: str, *, owner: int | None = None) -> bytes:
        return self.read(uid, path, owner=owner)

    def iter_read(self, uid: int, path: str, chunk: int = 1 << 20, *, owner: int | None = None) -> Iterator[bytes]:
        """The content in chunks of ``chunk`` bytes. Access is checked and the content pinned
        now: the iterator yields this version even if the file is overwritten meanwhile."""
        _check_count(chunk, "chunk", positive=True)
        _, fd = self._open_blob(uid, path, owner)
        f = open(fd, "rb", buffering=0)           # closes the fd even if never iterated

        def chunks() -> Iterator[bytes]:
            with f:
                while block := f.read(chunk):
                    yield block
        return chunks()

    def stat(self, uid: int, path: str, *, owner: int | None = None) -> dict:
        uid, owner, path = self._readable(uid, path, owner)
        with self._lock:
            return _stat(self._file_row(owner, path))

    def list(self, uid: int, prefix: str = "", *, owner: int | None = None) -> list[dict]:
        """Stats of the files at or below ``prefix`` (``""``: all), sorted by path. For another
        owner, only the files under prefixes shared with ``uid``; EACCES if none could be."""
        uid = _check_uid(uid)
        owner = uid if owner is None else _check_uid(owner, "owner")
        prefix = normpath(prefix, allow_root=True)
        with self._lock:
            if owner == uid:
                return [_stat(r) for r in self.index.files_under(uid, prefix)]
            grants = self.index.granted_prefixes(owner, uid)
            if any(covers(g, prefix) for g in grants):
                return [_stat(r) for r in self.index.files_under(owner, prefix)]
            inside = [g for g in grants if covers(prefix, g)]
            if not inside:
                raise FsError("EACCES", f"uid {owner} shares nothing under {prefix!r} with uid {uid}")
            rows = {r.path: r for g in inside for r in self.index.files_under(owner, g)}
            return [_stat(rows[p]) for p in sorted(rows)]

    # ----- sharing and quotas -----
    def share(self, uid: int, prefix: str, reader_uid: int) -> None:
        """Let ``reader_uid`` read (never write) uid's files at or below ``prefix`` (``""``: all),
        now and in future; idempotent."""
        uid, reader_uid = _check_uid(uid), _check_uid(reader_uid, "reader_uid")
        if reader_uid == uid:
            raise FsError("EINVAL", "a user cannot share with themselves")
        prefix = normpath(prefix, allow_root=True)
        with self._lock, self.index.tx():
            self.index.add_share(uid, prefix, reader_uid)

    def unshare(self, uid: int, prefix: str, reader_uid: int) -> None:
        uid, reader_uid = _check_uid(uid), _check_uid(reader_uid, "reader_uid")
        prefix = normpath(prefix, allow_root=True)
        with self._lock, self.index.tx():
            if not self.index.remove_share(uid, prefix, reader_uid):
                raise FsError("ENOENT", f"uid {uid} does not share {prefix!r} with uid {reader_uid}")

    def shares(self, uid: int) -> list[dict]:
        """The grants ``uid`` gave or received: ``{"owner", "prefix", "reader"}``."""
        uid = _check_uid(uid)
        with self._lock:
            return [{"owner": o, "prefix": p, "reader": r} for o, p, r in self.index.shares_of(uid)]

    def usage(self, uid: int) -> dict:
        uid = _check_uid(uid)
        with self._lock:
            return {"bytes": self.index.usage(uid), "quota": self._quota(uid)}

    def set_quota(self, uid: int, num_bytes: int) -> None:
        """Set uid's quota. Lowering it below usage keeps the files but refuses growth."""
        uid, num_bytes = _check_uid(uid), _check_count(num_bytes, "quota bytes")
        with self._lock, self.index.tx():
            self.index.set_quota(uid, num_bytes)

    # ----- housekeeping -----
    def gc(self) -> dict:
        """Delete crash debris: temp files of no open writer and blob files no file references.
        Returns counts: ``{"tmp_files", "orphan_blobs", "orphan_bytes"}``."""
        with self._lock:
            num_tmp = 0
            for f in self.blobs.tmp_dir.iterdir():
                if f not in self._temps:
                    f.unlink()
                    num_tmp += 1
            referenced = self.index.blob_refs()
            num_orphans = num_bytes = 0
            for f in self.blobs.all_files():
                if not (self.blobs.is_blob_path(f) and f.name in referenced):
                    num_bytes += f.stat().st_size
                    f.unlink()
                    num_orphans += 1
            return {"tmp_files": num_tmp, "orphan_blobs": num_orphans, "orphan_bytes": num_bytes}

    def fsck(self, verify_hashes: bool = True) -> list[str]:
        """Problems with the store's invariants (empty when sound): every reference count equals
        the files naming the blob, and every referenced blob exists with its size (and hash)."""
        with self._lock:
            problems = [f"blob {sha}: refs {stored} but {counted} files name it"
                        for sha, stored, counted in self.index.ref_mismatches()]
            for sha, (size, _) in sorted(self.index.blob_refs().items()):
                path = self.blobs.path(sha)
                if not path.is_file():
                    problems.append(f"blob {sha}: referenced but missing")
                elif path.stat().st_size != size:
                    problems.append(f"blob {sha}: size {path.stat().st_size}, index says {size}")
                elif verify_hashes and self.blobs.hash_of(sha) != sha:
                    problems.append(f"blob {sha}: content hash differs")
            return problems

    # ----- helpers; callers hold self._lock where noted -----
    def _quota(self, uid: int) -> int:
        return self.index.quota(uid, self.default_quota_bytes)

    def _writable(self, uid: int, path: str, owner: int | None) -> tuple[int, str]:
        uid = _check_uid(uid)
        if owner is not None and _check_uid(owner, "owner") != uid:
            raise FsError("EACCES", f"uid {uid} may not modify uid {owner}'s files (shares grant read only)")
        return uid, normpath(path)

    def _readable(self, uid: int, path: str, owner: int | None) -> tuple[int, int, str]:
        uid = _check_uid(uid)
        owner = uid if owner is None else _check_uid(owner, "owner")
        path = normpath(path)
        if owner != uid:
            with self._lock:
                if not any(covers(g, path) for g in self.index.granted_prefixes(owner, uid)):
                    raise FsError("EACCES", f"uid {owner} does not share {path!r} with uid {uid}")
        return uid, owner, path

    def _file_row(self, uid: int, path: str) -> FileRow:
        """The file's row, or ENOENT/EISDIR. Caller holds the lock."""
        row = self.index.get_file(uid, path)
        if row is None:
            if self.index.is_dir(uid, path):
                raise FsError("EISDIR", f"{path!r} is a directory")
            raise FsError("ENOENT", f"no such file: {path!r}")
        return row

    def _check_target(self, uid: int, path: str, overwrite: bool) -> FileRow | None:
        """Whether ``path`` may be (re)written; returns the file there now. Caller holds the lock."""
        parent = self.index.file_ancestor(uid, path)
        if parent is not None:
            raise FsError("ENOTDIR", f"cannot create {path!r}: {parent!r} is a file")
        if self.index.is_dir(uid, path):
            raise FsError("EISDIR", f"{path!r} is a directory")
        old = self.index.get_file(uid, path)
        if old is not None and not overwrite:
            raise FsError("EEXIST", f"{path!r} exists")
        return old

    def _open_blob(self, uid: int, path: str, owner: int | None) -> tuple[FileRow, int]:
        """Check access and open the current blob; the fd pins that version."""
        uid, owner, path = self._readable(uid, path, owner)
        with self._lock:
            row = self._file_row(owner, path)
            return row, self.blobs.open(row.sha256)
