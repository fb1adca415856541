"""Memory leases: device memory lent to services (the tuner) outside models and KV.

A lease is accounting the kernel enforces on itself: leased bytes count as used, so models
and KV pools are sized around them. ``mm_lease`` first evicts idle models (they page back in
on demand); if the bytes still do not fit it answers ``EAGAIN`` (try later) or, when they can
never fit beside the pinned models, ``ENOMEM``. When a model must come onto the device for
processes at least as important as a lease's priority, the lease is *revoked*: its holder sees
``state="revoked"`` in ``mm_leases``, checkpoints, frees its memory and calls ``mm_release``;
the waiting load proceeds once the bytes are back. A holder that does not release within
``REVOKE_GRACE_S``, or that goes down, loses the lease anyway.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum

from llmos.syscalls.errors import SyscallError

log = logging.getLogger("llmos.kernel")
REVOKE_GRACE_S = 60.0


class LeaseState(Enum):
    HELD = "held"
    REVOKED = "revoked"          # its holder is asked to give it back


@dataclass
class Lease:
    id: int
    holder: str                 # the service (or user) name that asked
    bytes: int
    priority: int
    purpose: str = ""
    state: LeaseState = LeaseState.HELD
    since: float = field(default_factory=time.monotonic)
    revoked_at: float | None = None

    def row(self) -> dict:
        return {"lease": self.id, "holder": self.holder, "bytes": self.bytes, "priority": self.priority,
                "state": self.state.value, "purpose": self.purpose, "age_s": round(time.monotonic() - self.since, 1)}


class LeaseTable:
    def __init__(self):
        self.leases: dict[int, Lease] = {}
        self.next_id = 1
        self.revocations = 0

    def used_bytes(self) -> int:
        """Bytes leased, revoked-but-not-yet-released included (the holder may still use them)."""
        return sum(lease.bytes for lease in self.leases.values())

    def grant(self, models, holder: str, nbytes: int, priority: int, purpose: str) -> Lease:
        """Lease ``nbytes`` of the device budget, evicting idle models if that makes it fit."""
        pinned = models.pinned_bytes()
        never = models.device_budget - models.reserve - pinned
        if nbytes > never:
            raise SyscallError("ENOMEM", f"lease of {nbytes} bytes can never fit: device budget "
                                         f"{models.device_budget}, reserve {models.reserve}, pinned models {pinned}")
        if not models.make_room_bytes(nbytes):
            raise SyscallError("EAGAIN", f"lease of {nbytes} bytes refused for now: {models.free_bytes()} "
                                         f"bytes free after evicting idle models (models in use and other "
                                         f"leases hold the rest); try again later")
        lease = Lease(self.next_id, holder, nbytes, priority, purpose)
        self.next_id += 1
        self.leases[lease.id] = lease
        log.info("lease %d: %d bytes to %s (priority %d, %s)", lease.id, nbytes, holder, priority, purpose)
        return lease

    def release(self, holder: str, lease_id: int) -> None:
        lease = self.leases.get(lease_id)
        if lease is None or lease.holder != holder:
            raise SyscallError("ENOENT", f"no lease {lease_id} held by {holder}")
        del self.leases[lease_id]
        log.info("lease %d released by %s", lease_id, holder)

    def drop_holder(self, holder: str) -> None:
        for lid in [lid for lid, lease in self.leases.items() if lease.holder == holder]:
            del self.leases[lid]
            log.info("lease %d dropped: its holder %s went down", lid, holder)

    def revoke_for(self, nice: int, need: int) -> int:
        """Revoke leases no more important than ``nice`` (least important, largest first) until
        ``need`` bytes are on their way back; returns the bytes being returned."""
        coming = sum(lease.bytes for lease in self.leases.values() if lease.state is LeaseState.REVOKED)
        for lease in sorted(self.leases.values(), key=lambda x: (-x.priority, -x.bytes)):
            if coming >= need:
                break
            if lease.state is LeaseState.HELD and lease.priority >= nice:
                lease.state, lease.revoked_at = LeaseState.REVOKED, time.monotonic()
                self.revocations += 1
                coming += lease.bytes
                log.info("lease %d of %s revoked for a priority %d load", lease.id, lease.holder, nice)
        return coming

    def expire(self) -> bool:
        """Take back revoked leases whose holders ignore the revocation; True if any."""
        now, taken = time.monotonic(), False
        for lid, lease in list(self.leases.items()):
            if lease.state is LeaseState.REVOKED and now - lease.revoked_at > REVOKE_GRACE_S:
                del self.leases[lid]
                taken = True
                log.warning("lease %d of %s taken back: not released %gs after revocation", lid,
                            lease.holder, REVOKE_GRACE_S)
        return taken

    def rows(self) -> list[dict]:
        return [lease.row() for lease in self.leases.values()]
