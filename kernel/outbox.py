"""The outbox: every frame the kernel sends — to clients and to services — is put here, and the
loop alone sends them (``flush``), at two points of its turn: after it has handled the syscalls
that came in, and after the model steps. Handlers and managers never touch a socket; they are
given the outbox, so each can be tested without a kernel process.
"""
from __future__ import annotations

from typing import Any

from llmos.syscalls import abi
from llmos.syscalls.errors import SyscallError


class Outbox:
    def __init__(self, stats=None):
        self.frames: list[tuple[bytes, bytes]] = []     # (routing id, payload), in order
        self.held: list[tuple[bytes, bytes]] = []       # replies waiting for the journal's commit
        self.stats = stats                              # counts errors sent (``stat``), if given

    def reply(self, call, result: Any, more: bool = False, held: bool = False) -> None:
        """A result frame for ``call`` (anything with ``identity`` and ``rid``). ``held``: it
        acknowledges a change to a process, so it waits until the journal has it (``release``)."""
        (self.held if held else self.frames).append((call.identity, abi.encode_reply(call.rid, result, more)))

    def release(self) -> None:
        """The journal committed: the held replies may go."""
        if self.held:
            self.frames.extend(self.held)
            self.held = []

    def error(self, identity: bytes, rid: Any, err: SyscallError) -> None:
        if self.stats is not None:
            self.stats.errors += 1
            self.stats.rejects[err.errno] += 1
        self.frames.append((identity, abi.encode_error(rid, err)))

    def fail(self, call, err: SyscallError) -> None:
        self.error(call.identity, call.rid, err)

    def send(self, identity: bytes, payload: bytes) -> None:
        """An already encoded frame (the kernel's calls to services)."""
        self.frames.append((identity, payload))

    def flush(self, chan) -> int:
        """Send everything queued on ``chan`` (the I/O thread's PAIR end); returns the count."""
        frames, self.frames = self.frames, []
        for identity, payload in frames:
            chan.send_multipart([identity, payload])
        return len(frames)
