"""Tenancy: how users share the device, and what each may hold.

Fair share. Within one priority level users are served by weighted fair queueing over the
tokens each is served (prefill and decode alike): every user has a virtual time, the tokens
served to it divided by its weight, and the scheduler fills each step from the user with the
smallest one (``Scheduler.schedule`` merges the users' run queues by it). A user who had
nothing runnable starts again at the smallest virtual time of the users still busy (start-time
fair queueing), so idling earns no credit for a later burst, and a flood of processes earns
its user no more than one user's share: the flood's size does not matter. ``nice`` still
orders one user's own processes, and priority levels still come before shares.

Quotas. ``kv_quota`` is a user's limit in KV blocks across all its processes and all pools: a
block shared by its processes (fork, prefix cache) counts once. ``usage`` is kept by the block
managers, which count each device block once per user that holds it. Root has no quota.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from llmos.kernel.security import ROOT_UID


@dataclass
class Shares:
    enabled: bool = True                            # False: served by arrival (``--no-fair-share``)
    weights: dict[int, float] = field(default_factory=dict)   # uid -> weight (default 1)
    default_kv_quota: int | None = None             # blocks, for every user but root
    kv_quotas: dict[int, int] = field(default_factory=dict)   # per-user overrides
    usage: Counter = field(default_factory=Counter)           # uid -> distinct device KV blocks held
    served: Counter = field(default_factory=Counter)          # uid -> tokens served
    vtime: dict[int, float] = field(default_factory=dict)     # uid -> virtual time

    def weight(self, uid: int) -> float:
        return self.weights.get(uid, 1.0)

    def set_weight(self, uid: int, weight: float) -> None:
        if not weight > 0:
            raise ValueError("a share must be > 0")
        self.weights[uid] = float(weight)

    def quota(self, uid: int) -> int | None:
        """KV blocks ``uid`` may hold in all, or None for no limit."""
        if uid in self.kv_quotas:
            return self.kv_quotas[uid]
        return None if uid == ROOT_UID else self.default_kv_quota

    def quota_room(self, uid: int) -> int | None:
        quota = self.quota(uid)
        return None if quota is None else quota - self.usage[uid]

    def key(self, uid: int) -> float:
        """Where ``uid`` stands in the fair queue (0 for everyone when shares are off)."""
        return self.vtime.get(uid, 0.0) if self.enabled else 0.0

    def charge(self, uid: int, num_tokens: int) -> None:
        self.served[uid] += num_tokens
        self.vtime[uid] = self.vtime.get(uid, 0.0) + num_tokens / self.weight(uid)

    def activate(self, uids, busy_before) -> None:
        """Users in ``uids`` that were not in ``busy_before`` (had nothing runnable) start at the
        smallest virtual time among those that were; when nobody was busy, all start equal."""
        fresh = [u for u in uids if u not in busy_before]
        if not fresh:
            return
        if busy_before:
            floor = min(self.vtime.get(u, 0.0) for u in busy_before)
        else:
            floor = max(self.vtime.get(u, 0.0) for u in fresh)
        for uid in fresh:
            self.vtime[uid] = max(self.vtime.get(uid, 0.0), floor)
