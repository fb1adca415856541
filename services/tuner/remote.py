"""The tuner's side of the ABI: a user's file store (through ``svc_call``) and memory leases."""
from __future__ import annotations

import time

from llmos.syscalls.client import Client
from llmos.syscalls.errors import SyscallError

PUT_CHUNK = 4 << 20


class UserFs:
    """One user's file store, as that user (the kernel checks their capabilities)."""

    def __init__(self, client: Client, uid: int):
        self.c, self.uid = client, uid

    def call(self, name: str, **args):
        return self.c.call("svc_call", call=name, args=args, uid=self.uid)

    def read(self, path: str, max_bytes: int = 1 << 30) -> bytes:
        out, size = [], 0
        for frame in self.c.stream("svc_call", call="fs_read", args={"path": path}, uid=self.uid):
            if frame:
                size += len(frame)
                if size > max_bytes:
                    raise SyscallError("EFBIG", f"{path} is larger than {max_bytes} bytes")
                out.append(frame)
        return b"".join(out)

    def put(self, path: str, data: bytes) -> dict:
        if len(data) <= PUT_CHUNK:
            return self.call("fs_put", path=path, data=data, overwrite=True)
        handle = self.call("fs_write_open", path=path, overwrite=True)["handle"]
        try:
            chunks = ({"call": "fs_write", "args": {"handle": handle, "data": data[i:i + PUT_CHUNK]},
                       "uid": self.uid} for i in range(0, len(data), PUT_CHUNK))
            for _ in self.c.pipeline("svc_call", chunks, window=4):
                pass
            return self.call("fs_write_commit", handle=handle)
        except BaseException:
            try:
                self.call("fs_write_abort", handle=handle)
            except SyscallError:
                pass
            raise

    def rm(self, path: str) -> None:
        try:
            self.call("fs_rm", path=path)
        except SyscallError as err:
            if err.errno != "ENOENT":
                raise


class LeaseHolder:
    """One memory lease at a time: acquire (waiting while the kernel says EAGAIN), poll for
    revocation (cheaply: at most every ``poll_s``), release."""

    def __init__(self, client: Client, poll_s: float = 0.25):
        self.c, self.poll_s = client, poll_s
        self.lease: int | None = None
        self._checked, self._revoked = 0.0, False

    def acquire(self, nbytes: int, priority: int, purpose: str, give_up, on_wait) -> bool:
        """True once leased; False if ``give_up()`` said so while waiting. ENOMEM propagates."""
        delay = 0.2
        while True:
            try:
                self.lease = self.c.mm_lease(bytes=nbytes, priority=priority, purpose=purpose)["lease"]
                self._revoked = False
                return True
            except SyscallError as err:
                if err.errno != "EAGAIN":
                    raise
                on_wait(err.message)
            end = time.monotonic() + delay
            while time.monotonic() < end:
                if give_up():
                    return False
                time.sleep(0.05)
            delay = min(delay * 2, 5.0)

    def revoked(self) -> bool:
        if self.lease is None or self._revoked:
            return self._revoked
        now = time.monotonic()
        if now - self._checked >= self.poll_s:
            self._checked = now
            rows = {r["lease"]: r for r in self.c.mm_leases()}
            row = rows.get(self.lease)
            self._revoked = row is None or row["state"] == "revoked"
        return self._revoked

    def release(self) -> None:
        if self.lease is not None:
            try:
                self.c.mm_release(lease=self.lease)
            except SyscallError:
                pass                     # already taken back
            self.lease = None
