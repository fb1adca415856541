"""Preemption policy: whose KV to take when a process cannot get blocks, and how.

Victims, in order:
  1. STOPPED processes holding device KV (least important, then latest arrival, first);
  2. BLOCKED processes (idle, awaiting input) holding device KV, same order;
  3. runnable processes the requester outranks (``outranks``, the scheduler's rule: by
     effective priority, then — between users at one priority level — by their fair shares of
     the pool, then arrival: an earlier arrival outranks a later one of equal standing, which
     keeps equal-priority processes from deadlocking), least important first.
Processes already in this step's batch and holders of blocks pinned by a pending fork copy
are never taken. Nothing is taken unless taking it makes the request fit the pool and the
requester's user quota (a dry run over reference counts, per block and per user), so a request
that cannot fit preempts nobody and simply waits. When only the quota is short, only the
user's own processes can help.

Cost rule ("auto"): recompute when the victim has at most ``recompute_max_tokens`` computed
tokens (cheaper to redo than to move) or the host swap space is short; otherwise swap.
"swap" mode falls back to recompute when host swap space is short.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

from llmos.kernel.block_manager import BlockManager
from llmos.kernel.proc import Process, ProcState

_IDLE_RANK = {ProcState.STOPPED: 0, ProcState.BLOCKED: 1}


def victim_order(requester: Process, procs: Iterable[Process], order_key: Callable,
                 outranks: Callable, excluded_pids: set[int], block_manager: BlockManager) -> list[Process]:
    """Processes whose device KV may be taken for ``requester``, first victim first.
    ``outranks(requester, proc)``: may a runnable ``proc`` be taken for it."""
    eligible = []
    for proc in procs:
        if (proc is requester or not proc.block_ids or proc.pid in excluded_pids
                or block_manager.is_pinned(proc)):
            continue
        rank = _IDLE_RANK.get(proc.state, 2)
        if rank == 2 and not (proc.is_runnable and outranks(requester, proc)):
            continue
        eligible.append((rank, proc))
    # Least important first: reverse scheduling order within each rank.
    eligible.sort(key=lambda item: order_key(item[1]), reverse=True)
    eligible.sort(key=lambda item: item[0])
    return [proc for _, proc in eligible]


def choose_victims(requester: Process, candidates: list[Process], num_needed: int,
                   quota_room: int | None, block_manager: BlockManager) -> list[Process] | None:
    """The shortest prefix of ``candidates`` after whose preemption ``num_needed`` more
    blocks fit both the pool and ``quota_room`` (the requester's user's blocks left, None for
    no quota); None if none does."""
    bm = block_manager
    num_free = bm.num_free_blocks
    released: Counter[int] = Counter()
    released_mine: Counter[int] = Counter()      # blocks the requester's user stops holding
    chosen: list[Process] = []
    for victim in candidates:
        pool_ok = num_needed <= num_free
        if pool_ok and (quota_room is None or num_needed <= quota_room):
            return chosen
        if pool_ok and victim.uid != requester.uid:
            continue                    # only the quota is short: other users can't help
        chosen.append(victim)
        for block_id in victim.block_ids:
            released[block_id] += 1
            if released[block_id] == bm.blocks[block_id].ref_count:
                num_free += 1
            if quota_room is not None and victim.uid == requester.uid:
                released_mine[block_id] += 1
                if released_mine[block_id] == bm.blocks[block_id].users.get(victim.uid, 0):
                    quota_room += 1
    fits = num_needed <= num_free and (quota_room is None or num_needed <= quota_room)
    return chosen if fits else None


def preempt_mode(mode: str, recompute_max_tokens: int, victim: Process,
                 block_manager: BlockManager) -> str:
    """"swap" or "recompute" for ``victim`` under the configured mode."""
    if mode == "recompute" or not block_manager.can_swap_out(victim):
        return "recompute"
    if mode == "swap":
        return "swap"
    return "recompute" if victim.num_computed_tokens <= recompute_max_tokens else "swap"


def preempt(victim: Process, mode: str, block_manager: BlockManager) -> list[tuple[int, int]]:
    """Take ``victim``'s device KV by ``mode``; returns the swap-out copies. A runnable
    victim becomes SWAPPED or READY; a STOPPED one comes back to that on cont; a BLOCKED one
    stays BLOCKED (its next input resumes it)."""
    if mode == "swap":
        copies = block_manager.swap_out(victim)
        victim.num_swaps += 1
        resumed_state = ProcState.SWAPPED
    else:
        copies = []
        block_manager.drop(victim)
        victim.num_recomputes += 1
        resumed_state = ProcState.READY
    victim.num_preemptions += 1
    victim.resume_pending = True
    if victim.state is ProcState.STOPPED and victim.stopped_from is not ProcState.BLOCKED:
        victim.stopped_from = resumed_state
    elif victim.is_runnable:
        victim.state = resumed_state
    return copies
