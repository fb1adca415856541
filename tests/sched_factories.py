"""Factories and checks for scheduler/block-manager tests. No model: results are hand-made."""
from __future__ import annotations

from collections import Counter
from itertools import count
from typing import Callable

from llmos.drivers.batch import StepPlan, StepResult
from llmos.kernel.block_manager import BlockManager
from llmos.kernel.proc import Process, ProcState
from llmos.kernel.scheduler import Event, Scheduler, SchedulerConfig

TOKEN = 7          # what the fake driver always samples
_token_base = count(1000, 1000)


def make_config(**overrides) -> SchedulerConfig:
    fields = dict(num_blocks=16, num_host_blocks=16, block_size=4, max_num_seqs=8,
                  max_num_batched_tokens=64, max_model_len=64)
    fields.update(overrides)
    return SchedulerConfig(**fields)


def make_scheduler(**overrides) -> Scheduler:
    return Scheduler(make_config(**overrides))


def unique_tokens(n: int) -> list[int]:
    """A prompt no other call shares (so the prefix cache stays out of the way)."""
    base = next(_token_base)
    return list(range(base, base + n))


def make_proc(pid: int, num_tokens: int = 6, token_ids: list[int] | None = None, **fields) -> Process:
    tokens = list(token_ids) if token_ids is not None else unique_tokens(num_tokens)
    fields.setdefault("max_tokens", 1000)
    return Process(pid=pid, token_ids=tokens, **fields)


def run_step(sched: Scheduler, sample: Callable[[int], int] | int = TOKEN) -> tuple[StepPlan, list[Event]]:
    """schedule -> fake driver -> update. ``sample`` is a token or a function of the pid.
    Every plan is checked for hazards before it is "executed"."""
    plan = sched.schedule()
    check_plan_hazards(sched, plan)
    pick = sample if callable(sample) else (lambda pid: sample)
    result = StepResult(plan.step_id, {c.pid: pick(c.pid) for c in plan.chunks if c.sample},
                        plan.num_tokens)
    return plan, sched.update(plan, result)


def run_until_done(sched: Scheduler, max_steps: int = 2000, sample=TOKEN) -> int:
    """Step until no process is runnable; returns the steps taken."""
    for n in range(max_steps):
        if not any(p.is_runnable for p in sched.procs.values()):
            return n
        run_step(sched, sample)
    raise AssertionError("processes did not finish")


def chunk_of(plan: StepPlan, pid: int):
    matches = [c for c in plan.chunks if c.pid == pid]
    return matches[0] if matches else None


def check_block_invariants(bm: BlockManager, procs) -> None:
    """Ref counts equal holders (+ fork pins); free + used = total; free blocks unreferenced;
    host blocks are free or held by exactly one process."""
    holders = Counter()
    for proc in procs:
        holders.update(proc.block_ids)
    holders.update(bm.pinned_block_ids)
    for block in bm.blocks:
        assert block.ref_count == holders[block.block_id], f"block {block.block_id}"
        assert (block.ref_count == 0) == (block.block_id in bm.free_block_ids)
    used = sum(1 for b in bm.blocks if b.ref_count > 0)
    assert used + bm.num_free_blocks == bm.num_blocks
    host_held = Counter(h for proc in procs for h in proc.host_block_ids)
    host_held.update(bm.host_ids_to_release)
    assert all(n == 1 for n in host_held.values())
    assert not set(host_held) & set(bm.free_host_block_ids)
    assert len(host_held) + bm.num_free_host_blocks == len(bm.host_blocks)
    for uid in {p.uid for p in procs}:       # a block shared by one user's processes counts once
        assert bm.kv_blocks_used_by(uid) == len({b for p in procs if p.uid == uid for b in p.block_ids})


def check_scheduler_invariants(sched: Scheduler, plan: StepPlan | None = None) -> None:
    bs = sched.config.block_size
    procs = list(sched.procs.values())
    check_block_invariants(sched.block_manager, procs)
    for proc in procs:
        assert not (proc.block_ids and proc.host_block_ids), f"pid {proc.pid} on both sides"
        if proc.state is ProcState.ZOMBIE:
            assert not proc.block_ids and not proc.host_block_ids
            continue
        covered = len(proc.host_block_ids or proc.block_ids) * bs
        assert covered >= proc.num_computed_tokens, f"pid {proc.pid} KV not covered"
        assert proc.num_computed_tokens < proc.num_tokens or plan is not None
        if proc.state is ProcState.SWAPPED:
            assert proc.host_block_ids
    if plan is not None:
        assert plan.num_tokens <= sched.config.max_num_batched_tokens
        assert len(plan.chunks) <= sched.config.max_num_seqs
        assert len({c.pid for c in plan.chunks}) == len(plan.chunks)


def check_plan_hazards(sched: Scheduler, plan: StepPlan) -> None:
    """Right after schedule(): every chunk's table covers its end and the blocks it writes
    belong to it alone; the driver's order (swap_out, swap_in, copies, forward) never reads
    a block that an earlier move of the same plan overwrote."""
    bm, bs = sched.block_manager, sched.config.block_size
    for chunk in plan.chunks:
        proc = sched.get(chunk.pid)
        assert len(chunk.block_ids) * bs >= chunk.end_pos, f"pid {chunk.pid} table too short"
        assert chunk.token_ids == proc.token_ids[chunk.start_pos:chunk.end_pos]
        assert chunk.sample == (chunk.end_pos == proc.num_tokens)
        for block_id in chunk.block_ids[chunk.start_pos // bs:]:
            assert bm.blocks[block_id].ref_count == 1, f"pid {chunk.pid} writes shared block {block_id}"
    swapped_in_devices = {dev for _, dev in plan.swap_in}
    assert not {host for _, host in plan.swap_out} & {host for host, _ in plan.swap_in}
    assert not swapped_in_devices & {b for pair in plan.copies for b in pair}
