"""The ``fs`` service: the file store behind the ABI.

Thin adapters from checked arguments to ``FileStore``. Files live in per-user namespaces
(the caller's uid, verified by the kernel); another user's files are read with ``owner=UID``
once shared. Small files move in one call (``fs_put``/``fs_get``); large ones in chunks, both
ways, never whole in memory: ``fs_write_open`` / ``fs_write`` / ``fs_write_commit`` up, and
the streamed ``fs_read`` (or ``fs_get`` with ``offset``/``length``) down.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from llmos.services.base import Service
from llmos.services.fs.errors import FsError
from llmos.services.fs.store import FileStore
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import Arg, Syscall

CHUNK = 1 << 20                  # bytes per streamed frame
MAX_GET = 8 << 20                # fs_get answers at most this much per call
WRITER_IDLE_S = 600.0            # an upload untouched this long is aborted
MAX_APPEND = 64 << 20            # fs_append rewrites the file: kept to modest logs and datasets

_PATH = Arg("path", "str", required=True, max_len=4096)
_OWNER = Arg("owner", "int", min=0, doc="whose namespace (a uid that shared it with you); default: yours")
CALLS = (
    Syscall(0, "fs_put", (_PATH, Arg("data", "bytes", required=True), Arg("overwrite", "bool", default=True)),
            cap="fs", doc="Write a whole (small) file atomically and durably.", returns="{path, size, sha256, mtime, owner}"),
    Syscall(0, "fs_get", (_PATH, _OWNER, Arg("offset", "int", default=0, min=0),
                          Arg("length", "int", min=0, max=MAX_GET)),
            cap="fs", doc=f"Read a file (at most {MAX_GET} bytes per call; use offset/length or fs_read for more).",
            returns="bytes"),
    Syscall(0, "fs_read", (_PATH, _OWNER), cap="fs", stream=True,
            doc=f"Stream a file in {CHUNK}-byte frames.", returns="frames of bytes"),
    Syscall(0, "fs_write_open", (_PATH, Arg("overwrite", "bool", default=True)), cap="fs",
            doc="Start a chunked upload; returns a handle for fs_write / fs_write_commit / fs_write_abort.",
            returns="{handle}"),
    Syscall(0, "fs_write", (Arg("handle", "str", required=True, max_len=64), Arg("data", "bytes", required=True)),
            cap="fs", doc="Append a chunk to an upload.", returns="{size}"),
    Syscall(0, "fs_write_commit", (Arg("handle", "str", required=True, max_len=64),), cap="fs",
            doc="Finish an upload: the file appears whole, atomically.", returns="{path, size, sha256, mtime, owner}"),
    Syscall(0, "fs_write_abort", (Arg("handle", "str", required=True, max_len=64),), cap="fs",
            doc="Drop an upload; the old file (if any) stays.", returns="true"),
    Syscall(0, "fs_stat", (_PATH, _OWNER), cap="fs", doc="Size, hash, time, owner.",
            returns="{path, size, sha256, mtime, owner}"),
    Syscall(0, "fs_list", (Arg("prefix", "str", default="", max_len=4096), _OWNER), cap="fs",
            doc="Files under a prefix (whole path components).", returns="[{path, size, sha256, mtime, owner}]"),
    Syscall(0, "fs_rm", (_PATH,), cap="fs", doc="Remove a file.", returns="true"),
    Syscall(0, "fs_mv", (Arg("src", "str", required=True, max_len=4096), Arg("dst", "str", required=True, max_len=4096),
                         Arg("overwrite", "bool", default=False)), cap="fs", doc="Rename a file.",
            returns="{path, size, sha256, mtime, owner}"),
    Syscall(0, "fs_share", (Arg("prefix", "str", required=True, max_len=4096), Arg("reader", "int", required=True, min=0),
                            Arg("revoke", "bool", default=False)), cap="fs",
            doc="Give (or with revoke take back) read access to a path or prefix ('' = everything) to uid reader.",
            returns="true"),
    Syscall(0, "fs_usage", cap="fs", doc="Your storage use and quota.", returns="{bytes, quota}"),
    Syscall(0, "fs_append", (_PATH, Arg("data", "bytes", required=True, max_len=MAX_GET)), cap="fs",
            doc=f"Append to a file (created if missing) atomically; files up to {MAX_APPEND} bytes.",
            returns="{path, size, sha256, mtime, owner, lines}"),
    Syscall(0, "fs_export", (Arg("prefix", "str", required=True, max_len=4096), _OWNER,
                             Arg("dest_root", "str", required=True, max_len=4096)), cap="svc",
            doc="(kernel and services) Copy the files under prefix into a local directory named by their "
                "content, under dest_root; it appears whole or not at all.", returns="{dir, files, created}"),
)


def _fs(fn):
    """Store refusals become the same errno replies any syscall gives."""
    def wrapped(*a, **kw):
        try:
            return fn(*a, **kw)
        except FsError as err:
            raise SyscallError(err.errno, err.message)
    return wrapped


class FsService(Service):
    name = "fs"
    calls = CALLS

    def setup(self) -> None:
        root = Path(os.environ.get("LLMOS_SERVICE_DIR", ".")) / "store"
        quota = int(os.environ.get("LLMOS_FS_QUOTA", 1 << 30))
        self.store = FileStore(root, default_quota_bytes=quota)
        self.writers: dict[str, tuple[int, object, float]] = {}   # handle -> (uid, Writer, last touched)

    def handlers(self):
        return {"fs_put": self.put, "fs_get": self.get, "fs_read": self.read, "fs_write_open": self.write_open,
                "fs_write": self.write, "fs_write_commit": self.commit, "fs_write_abort": self.abort,
                "fs_stat": self.stat, "fs_list": self.list, "fs_rm": self.rm, "fs_mv": self.mv,
                "fs_share": self.share, "fs_usage": self.usage, "fs_append": self.append,
                "fs_export": self.export}

    @_fs
    def put(self, caller, path, data, overwrite):
        return self.store.put(caller["uid"], path, data, overwrite=overwrite)

    @_fs
    def get(self, caller, path, owner, offset, length):
        size = self.store.stat(caller["uid"], path, owner=owner)["size"]
        if length is None and size - offset > MAX_GET:
            raise SyscallError("E2BIG", f"{path} has {size} bytes; read it with fs_read or in pieces of "
                                        f"at most {MAX_GET} (offset/length)")
        return self.store.read(caller["uid"], path, offset, length, owner=owner)

    def read(self, caller, path, owner):
        try:
            chunks = self.store.iter_read(caller["uid"], path, CHUNK, owner=owner)   # access checked here
        except FsError as err:
            raise SyscallError(err.errno, err.message)
        yield from chunks

    @_fs
    def write_open(self, caller, path, overwrite):
        self._expire_writers()
        handle = secrets.token_hex(8)
        self.writers[handle] = (caller["uid"], self.store.open_write(caller["uid"], path, overwrite), time.monotonic())
        return {"handle": handle}

    def _writer(self, caller, handle):
        uid, writer, _ = self.writers.get(handle, (None, None, 0))
        if writer is None or uid != caller["uid"]:
            raise SyscallError("ENOENT", f"no upload {handle}")
        self.writers[handle] = (uid, writer, time.monotonic())
        return writer

    @_fs
    def write(self, caller, handle, data):
        writer = self._writer(caller, handle)
        writer.write(data)
        return {"size": writer.size}

    @_fs
    def commit(self, caller, handle):
        writer = self._writer(caller, handle)
        del self.writers[handle]
        return writer.commit()

    @_fs
    def abort(self, caller, handle):
        self._writer(caller, handle).abort()
        del self.writers[handle]
        return True

    def _expire_writers(self) -> None:
        now = time.monotonic()
        for handle, (_, writer, touched) in list(self.writers.items()):
            if now - touched > WRITER_IDLE_S:
                writer.abort()
                del self.writers[handle]

    @_fs
    def stat(self, caller, path, owner):
        return self.store.stat(caller["uid"], path, owner=owner)

    @_fs
    def list(self, caller, prefix, owner):
        return self.store.list(caller["uid"], prefix, owner=owner)

    @_fs
    def rm(self, caller, path):
        self.store.rm(caller["uid"], path)
        return True

    @_fs
    def mv(self, caller, src, dst, overwrite):
        return self.store.mv(caller["uid"], src, dst, overwrite=overwrite)

    @_fs
    def share(self, caller, prefix, reader, revoke):
        (self.store.unshare if revoke else self.store.share)(caller["uid"], prefix, reader)
        return True

    @_fs
    def usage(self, caller):
        return self.store.usage(caller["uid"])

    @_fs
    def append(self, caller, path, data):
        uid, old = caller["uid"], b""
        try:
            size = self.store.stat(uid, path)["size"]
        except FsError as err:
            if err.errno != "ENOENT":
                raise
        else:
            if size + len(data) > MAX_APPEND:
                raise SyscallError("EFBIG", f"{path}: appending would pass {MAX_APPEND} bytes")
            old = self.store.get(uid, path)
        new = old + data
        return {**self.store.put(uid, path, new), "lines": new.count(b"\n")}

    @_fs
    def export(self, caller, prefix, owner, dest_root):
        if "svc" not in caller.get("caps", ()):
            raise SyscallError("EPERM", "fs_export is for the kernel and services")
        uid, prefix = caller["uid"], prefix.strip("/")
        rows = self.store.list(uid, prefix, owner=owner)
        if not rows:
            raise SyscallError("ENOENT", f"no files under {prefix!r}")
        files = sorted((r["path"][len(prefix):].lstrip("/"), r["sha256"]) for r in rows)
        if any(not rel for rel, _ in files):
            raise SyscallError("ENOTDIR", f"{prefix!r} is a file; give the directory that holds it")
        digest = hashlib.sha256(repr(files).encode()).hexdigest()[:32]
        root = Path(dest_root)
        dest = root / digest
        created = False
        if not dest.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
            try:
                for rel, _ in files:
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "wb") as out:
                        for chunk in self.store.iter_read(uid, f"{prefix}/{rel}", CHUNK, owner=owner):
                            out.write(chunk)
                os.rename(tmp, dest)
                created = True
            except FileExistsError:
                pass                      # exported meanwhile by an earlier call: same content
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return {"dir": str(dest), "files": [rel for rel, _ in files], "created": created}
