"""Tenancy syscalls and checks: users' fair-share weights (``user_set``), what each holds
(``shares``), and the quotas a spawn, write or fork must respect (``tenancy`` has the policy)."""
from __future__ import annotations

import math

from llmos.kernel import audit
from llmos.syscalls.errors import SyscallError


def check_procs(k, user, num_new: int) -> None:
    """Live processes per user, every state and every fork counted (root has no limit)."""
    limit = k.cfg.max_procs_per_user
    live = k.table.num_live(user.uid)
    if not user.is_root and live + num_new > limit:
        audit.event("quota_refused", user=user.name, quota="procs", have=live, asked=num_new, limit=limit)
        raise SyscallError("EAGAIN", f"process quota: user {user.name} has {live} of {limit}"
                                     + (f"; {num_new} more would not fit" if num_new > 1 else ""))


def check_kv(k, user, num_tokens: int, entry=None) -> None:
    """A process that would need more KV blocks than its user's whole quota can never run
    (on ``entry``'s pool where it is loaded: its recurrent-state blocks count too)."""
    quota = k.shares.quota(user.uid)
    engine = getattr(entry, "engine", None)
    need = (engine.sched.block_manager.blocks_for_seq(num_tokens) if engine is not None
            else math.ceil(num_tokens / k.cfg.block_size))
    if quota is not None and need > quota:
        audit.event("quota_refused", user=user.name, quota="kv_blocks", asked=need, limit=quota)
        raise SyscallError("ENOMEM", f"needs up to {need} KV blocks; user quota is {quota}")


def sys_user_set(k, call):
    a = call.args
    user = k.users.set_share(a["name"], a["share"]) if a["share"] is not None else k.users.get(a["name"])
    k.shares.set_weight(user.uid, user.share)
    if a["share"] is not None:
        audit.event("user_set", user=call.user.name, target=user.name, share=user.share)
    return {"user": user.name, "uid": user.uid, "share": user.share}


def sys_shares(k, call):
    """The caller's row (root with ``all``: every user with live processes or a share set)."""
    me, shares = call.user, k.shares
    live: dict[int, int] = {}
    for p in k.table.procs.values():
        if p.is_alive:
            live[p.uid] = live.get(p.uid, 0) + 1
    weights = {uid: shares.weight(uid) for uid in live}
    total = sum(weights.values())
    if me.is_root and call.args["all"]:
        uids = sorted(set(live) | {u.uid for u in k.users.users.values() if u.share != 1.0})
    else:
        uids = [me.uid]
    rows = []
    for uid in uids:
        user = k.users.by_uid(uid)
        rows.append({"user": user.name, "uid": uid, "share": shares.weight(uid),
                     "fraction": round(weights[uid] / total, 4) if uid in weights else 0.0,
                     "tokens_served": shares.served[uid], "procs": live.get(uid, 0),
                     "max_procs": None if user.is_root else k.cfg.max_procs_per_user,
                     "kv_blocks": shares.usage[uid], "kv_quota": shares.quota(uid)})
    return rows
