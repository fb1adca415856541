"""The priority scheduler: continuous batching with chunked prefill over a paged KV pool.

One step is ``plan = schedule(); result = driver.execute(plan); events = update(plan, result)``.
``schedule`` walks runnable processes by effective priority (nice minus an aging bonus), then
— between users — by fair share (``tenancy.Shares``: weighted fair queueing over tokens served),
then arrival; it gives each a decode token or a prefill chunk under the token budget, finds
blocks for it (preempting processes it outranks if needed, see ``preempt``) within its user's
KV quota, and returns a ``StepPlan``. ``update`` folds the sampled tokens back, charges each
user for the tokens served and finishes turns.

The scheduler keeps a run queue of pids (``pids``) over the kernel's process table (``table``:
pid -> the one ``Process`` record); block tables live in the records and change only through
the block manager. Aging lifts a process that waits while processes of a better nice run, so
nothing starves across priority levels; waiting behind equals (of one's own user, or of users
within their shares) is queueing, not starvation, and earns nothing.

The signal-like controls (``kill``, ``stop``, ``fork``, ...) are called by syscall handlers
between steps; they raise ``KeyError`` for an unknown pid and ``ValueError`` for a bad state
or argument.
"""
from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from llmos.drivers.batch import SeqChunk, StepPlan, StepResult
from llmos.kernel import preempt
from llmos.kernel.block_manager import BlockManager
from llmos.kernel.proc import NICE_MAX, NICE_MIN, RUNNABLE, Process, ProcState, Wait
from llmos.kernel.tenancy import Shares

PREEMPT_MODES = ("auto", "swap", "recompute")


class EventKind(Enum):
    TOKEN = "token"
    FINISHED = "finished"
    PREEMPTED = "preempted"
    RESUMED = "resumed"


@dataclass(frozen=True)
class Event:
    kind: EventKind
    pid: int
    token_id: int | None = None  # for "token"
    reason: str | None = None    # "finished": stop|length|killed|quota|...; "preempted": swap|recompute


@dataclass
class SchedulerConfig:
    num_blocks: int
    num_host_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    aging_steps: int = 32
    preempt_mode: str = "auto"
    recompute_max_tokens: int = 64
    eos_token_ids: frozenset[int] = frozenset()
    max_adapters_per_step: int = 0      # distinct LoRA adapters one forward pass can hold (0: no limit)
    token_blocks: bool = True           # False: tokens keep no KV (a recurrent-only model's state blocks)

    def __post_init__(self):
        positive = ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "aging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_host_blocks < 0 or self.recompute_max_tokens < 0:
            raise ValueError("num_host_blocks and recompute_max_tokens must be >= 0")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.token_blocks and -(-self.max_model_len // self.block_size) > self.num_blocks:
            # A lone process must always fit, or it could wait forever.
            raise ValueError("max_model_len does not fit in num_blocks * block_size")
        if self.preempt_mode not in PREEMPT_MODES:
            raise ValueError(f"preempt_mode must be one of {PREEMPT_MODES}")
        self.eos_token_ids = frozenset(self.eos_token_ids)


@dataclass
class _Step:
    """Working state of one ``schedule`` call."""
    budget: int
    chunks: list[SeqChunk] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[tuple[int, str]] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    adapters: set[str] = field(default_factory=set)
    prefilling: set[int] = field(default_factory=set)   # hashes of prompt blocks computed this step
    failed_need: dict[int, int] = field(default_factory=dict)   # uid -> fewest blocks it could not get
    runnable: dict[int, list] = field(default_factory=dict)      # uid -> its runnable processes
    max_nice: int = NICE_MIN - 1                                  # the least important of them

    @property
    def busy_pids(self) -> set[int]:
        return {c.pid for c in self.chunks} | {pid for pid, _ in self.preempted}


class Scheduler:
    def __init__(self, config: SchedulerConfig, table: dict[int, Process] | None = None,
                 shares: Shares | None = None, kv_variant: Callable[[int, int], int] | None = None,
                 state_blocks: int = 0):
        self.config = config
        self.table: dict[int, Process] = table if table is not None else {}   # the kernel's records
        self.shares = shares if shares is not None else Shares()
        self.block_manager = BlockManager(config.num_blocks, config.num_host_blocks, config.block_size,
                                          usage=self.shares.usage, kv_variant=kv_variant,
                                          state_blocks=state_blocks, token_blocks=config.token_blocks)
        self.pids: dict[int, None] = {}              # the run queue: pids scheduled here, in order
        self.busy_uids: set[int] = set()             # users with runnable processes at the last step
        self.running_pids: set[int] = set()          # the last step's batch
        self.pending_copies: list[tuple[int, int]] = []
        self.step_id = 0
        self._num_arrivals = 0
        self._resumed: dict[int, list[int]] = {}     # step_id -> pids resumed in it
        self._scheduled_at = time.monotonic()

    # ----- the run queue -----
    @property
    def procs(self) -> dict[int, Process]:
        """The records of the pids queued here (a snapshot)."""
        return {pid: self.table[pid] for pid in self.pids}

    def _queued(self):
        table = self.table
        return (table[pid] for pid in self.pids)

    def has_work(self) -> bool:
        """Something to run or copy: derived from the queue, never set by hand."""
        return bool(self.pending_copies) or any(p.is_runnable for p in self._queued())

    def add(self, proc: Process) -> Process:
        if proc.pid in self.pids:
            raise ValueError(f"pid {proc.pid} already exists")
        if not 1 <= proc.num_tokens < self.config.max_model_len:
            raise ValueError(f"prompt must have 1..{self.config.max_model_len - 1} tokens")
        assert not proc.block_ids and not proc.host_block_ids and proc.num_computed_tokens == 0
        proc.state, proc.wait = ProcState.READY, None
        self._admit(proc)
        return proc

    def attach(self, proc: Process) -> Process:
        """Queue a live process that holds no KV in whatever state it is in (its model came
        back to the device: it recomputes what it had)."""
        if proc.pid in self.pids:
            raise ValueError(f"pid {proc.pid} already exists")
        assert not proc.block_ids and not proc.host_block_ids and proc.is_alive
        proc.num_computed_tokens = 0
        self._admit(proc)
        return proc

    def get(self, pid: int) -> Process:
        if pid not in self.pids:
            raise KeyError(f"no process {pid}")
        return self.table[pid]

    def _admit(self, proc: Process) -> None:
        proc.arrival = self._num_arrivals
        self._num_arrivals += 1
        self.table[proc.pid] = proc
        self.pids[proc.pid] = None

    def _alive(self, pid: int) -> Process:
        proc = self.get(pid)
        if not proc.is_alive:
            raise ValueError(f"process {pid} has exited")
        return proc

    def effective_priority(self, proc: Process) -> int:
        return proc.nice - proc.age // self.config.aging_steps

    def order_key(self, proc: Process) -> tuple[int, int]:
        """One user's scheduling order: smaller runs first."""
        return self.effective_priority(proc), proc.arrival

    def outranks(self, proc: Process, other: Process, num_needed: int = 0) -> bool:
        """May ``proc`` (asking for ``num_needed`` blocks) take runnable ``other``'s KV? By
        effective priority; within one user, or with shares off, by arrival; between users at
        one priority level by their shares of this pool: ``other``'s user must hold more blocks
        per unit of weight than ``proc``'s would — or, when ``proc``'s holds no more than
        ``other``'s, the earlier arrival wins (so equals never deadlock)."""
        mine, theirs = self.effective_priority(proc), self.effective_priority(other)
        if mine != theirs or proc.uid == other.uid or not self.shares.enabled:
            return self.order_key(other) > self.order_key(proc)
        bm, w = self.block_manager, self.shares.weight
        held_mine = bm.kv_blocks_used_by(proc.uid) / w(proc.uid)
        held_theirs = bm.kv_blocks_used_by(other.uid) / w(other.uid)
        if held_theirs > (bm.kv_blocks_used_by(proc.uid) + num_needed) / w(proc.uid):
            return True
        return held_mine <= held_theirs and other.arrival > proc.arrival

    # ----- one step -----
    def schedule(self) -> StepPlan:
        self.step_id += 1
        self._scheduled_at = time.monotonic()
        step = _Step(budget=self.config.max_num_batched_tokens)
        for proc in self._fair_order(step):
            if proc.pid not in step.busy_pids and self._adapter_fits(proc, step):
                if self._schedule_one(proc, step) and proc.adapter is not None:
                    step.adapters.add(proc.adapter)
        self._age_and_mark(step)
        copies, self.pending_copies = self.pending_copies, []
        self.block_manager.end_step()
        if step.resumed:
            self._resumed[self.step_id] = step.resumed
        return StepPlan(step_id=self.step_id, chunks=step.chunks, swap_out=step.swap_out,
                        swap_in=step.swap_in, copies=copies, preempted=step.preempted)

    def _fair_order(self, step: _Step):
        """Runnable processes in scheduling order, until the batch is full: each user's queue in
        ``order_key`` order, merged by (effective priority, the user's virtual time as this
        step's chunks advance it, arrival). With shares off this is plain ``order_key`` order."""
        queues: dict[int, list[Process]] = {}
        mixed: set[int] = set()              # users whose queue is not in arrival order already
        aging, max_nice = self.config.aging_steps, step.max_nice
        for proc in self._queued():          # the run queue is in arrival order
            if proc.state in RUNNABLE:
                queue = queues.get(proc.uid)
                if queue is None:
                    queue = queues[proc.uid] = []
                elif proc.age or proc.nice != queue[0].nice or queue[0].age:
                    mixed.add(proc.uid)
                queue.append(proc)
                if proc.nice > max_nice:
                    max_nice = proc.nice
        step.runnable, step.max_nice = queues, max_nice
        shares = self.shares
        shares.activate(queues, self.busy_uids)
        self.busy_uids = set(queues)
        vtime = {uid: shares.key(uid) for uid in queues}
        heads: dict[int, deque] = {}
        heap = []
        for uid, procs in queues.items():
            if uid in mixed:                 # stable: arrival order within one effective priority
                procs.sort(key=lambda p: p.nice - p.age // aging)
            heads[uid] = deque(procs)
            heap.append((self.effective_priority(procs[0]), vtime[uid], procs[0].arrival, uid))
        heapq.heapify(heap)
        while heap and len(step.chunks) < self.config.max_num_seqs and step.budget > 0:
            uid = heapq.heappop(heap)[3]
            queue = heads[uid]
            budget = step.budget
            yield queue.popleft()
            if shares.enabled:
                vtime[uid] += (budget - step.budget) / shares.weight(uid)
            if queue:
                head = queue[0]
                heapq.heappush(heap, (self.effective_priority(head), vtime[uid], head.arrival, uid))

    def _adapter_fits(self, proc: Process, step: _Step) -> bool:
        """A pass holds at most ``max_adapters_per_step`` distinct adapters (the device slots);
        a process whose adapter would be one too many waits for a later step (aging lifts it)."""
        cap = self.config.max_adapters_per_step
        return (proc.adapter is None or cap == 0 or proc.adapter in step.adapters
                or len(step.adapters) < cap)

    def _schedule_one(self, proc: Process, step: _Step) -> bool:
        bm = self.block_manager
        num_cached = 0
        if not proc.block_ids and not proc.host_block_ids and proc.num_computed_tokens == 0:
            num_cached = bm.match_prefix(proc)
            first = bm.first_uncached_hash(proc, num_cached)
            if first is not None and first in step.prefilling:
                if num_cached:          # another process computes these blocks now: share them next step
                    bm.drop(proc)
                return False
            if first is not None:
                step.prefilling.add(first)
        num_new = min(proc.num_uncomputed_tokens, step.budget)
        assert num_new > 0, f"runnable pid {proc.pid} has nothing to compute"
        if not self._make_room(proc, bm.num_blocks_needed(proc, num_new), step):
            if num_cached:
                bm.drop(proc)       # a waiting process holds nothing; the cache keeps the blocks
            return False
        proc.num_cached_tokens += num_cached
        if proc.host_block_ids:
            step.swap_in += bm.swap_in(proc)
        bm.allocate(proc, num_new)
        if proc.resume_pending:
            proc.resume_pending = False
            step.resumed.append(proc.pid)
        start, end = proc.num_computed_tokens, proc.num_computed_tokens + num_new
        history = list(proc.token_ids[:end]) if proc.sampling.repetition_penalty != 1.0 else None
        step.chunks.append(SeqChunk(pid=proc.pid, token_ids=proc.token_ids[start:end], start_pos=start,
                                    block_ids=list(proc.block_ids), sample=end == proc.num_tokens,
                                    sampling=proc.sampling, history=history, adapter=proc.adapter,
                                    prompt_len=proc.num_prompt_tokens, seq_len=proc.num_tokens))
        step.budget -= num_new
        return True

    def _make_room(self, proc: Process, num_needed: int, step: _Step) -> bool:
        """Make ``num_needed`` blocks available to ``proc`` within its user's quota, preempting
        if that suffices. A failure is remembered for the step: a later process of the same user
        (never more important) asking for as many blocks fails at once, so a queue of thousands
        costs one dry run per user, not one each."""
        bm, room = self.block_manager, self.shares.quota_room(proc.uid)
        if num_needed <= bm.num_free_blocks and (room is None or num_needed <= room):
            return True
        if num_needed >= step.failed_need.get(proc.uid, num_needed + 1):
            return False
        order = preempt.victim_order(proc, self._queued(), self.order_key,
                                     lambda p, q: self.outranks(p, q, num_needed), step.busy_pids, bm)
        victims = preempt.choose_victims(proc, order, num_needed, room, bm)
        if victims is None:
            step.failed_need[proc.uid] = min(num_needed, step.failed_need.get(proc.uid, num_needed))
            return False
        for victim in victims:
            self._preempt(victim, step)
        return True

    def _preempt(self, victim: Process, step: _Step) -> None:
        cfg = self.config
        mode = preempt.preempt_mode(cfg.preempt_mode, cfg.recompute_max_tokens, victim, self.block_manager)
        step.swap_out += preempt.preempt(victim, mode, self.block_manager)
        step.preempted.append((victim.pid, mode))

    def _age_and_mark(self, step: _Step) -> None:
        """Scheduled processes are RUNNING, the rest of the last batch READY; the others age if a
        better nice ran (see above). Only those can change, so a long queue of equals costs
        nothing here."""
        table = self.table
        scheduled = {c.pid for c in step.chunks}
        for pid in self.running_pids - scheduled:
            proc = table.get(pid)
            if proc is not None and proc.state is ProcState.RUNNING:
                proc.state = ProcState.READY
        for pid in scheduled:
            proc = table[pid]
            proc.state, proc.age = ProcState.RUNNING, 0
        self.running_pids = scheduled
        best_nice = min((table[pid].nice for pid in scheduled), default=NICE_MAX + 1)
        if best_nice >= step.max_nice:
            return                                  # nobody waits behind a better nice
        for procs in step.runnable.values():
            for proc in procs:
                if best_nice < proc.nice and proc.pid not in scheduled and proc.state in RUNNABLE:
                    proc.age += 1

    def update(self, plan: StepPlan, result: StepResult) -> list[Event]:
        """Fold the driver's result into the process table; returns events in order."""
        assert result.step_id == plan.step_id, "result is for another plan"
        events = [Event(EventKind.PREEMPTED, pid, reason=mode) for pid, mode in plan.preempted]
        events += [Event(EventKind.RESUMED, pid) for pid in self._resumed.pop(plan.step_id, [])]
        elapsed = time.monotonic() - self._scheduled_at
        for chunk in plan.chunks:
            proc = self.table.get(chunk.pid) if chunk.pid in self.pids else None
            if proc is None or proc.state is not ProcState.RUNNING:
                continue
            assert proc.num_computed_tokens == chunk.start_pos, f"pid {proc.pid} out of step"
            self.shares.charge(proc.uid, chunk.num_tokens)
            proc.time_running += elapsed
            proc.num_computed_tokens = chunk.end_pos
            self.block_manager.cache_full_blocks(proc)
            if chunk.sample:
                token_id = result.sampled[chunk.pid]
                self._grow(proc, [token_id])
                proc.tokens_out += 1
                if proc.first_token_at is None:
                    proc.first_token_at = time.time()
                events.append(Event(EventKind.TOKEN, proc.pid, token_id=token_id))
                reason = self._finish_reason(proc, token_id)
                if reason is not None:
                    self._end_turn(proc, reason)
                    events.append(Event(EventKind.FINISHED, proc.pid, reason=reason))
        return events

    def _grow(self, proc: Process, token_ids: list[int], turn: bool = False) -> None:
        """Append a sampled token or a new turn's input. If the model computes other KV for the
        longer sequence (``kv_variant``: Phi-3's long rope factors past its original length),
        the KV it holds is dropped and recomputed, as transformers' ``generate`` does."""
        variant = self.block_manager.kv_variant
        before = variant(proc.num_prompt_tokens, proc.num_tokens)
        if turn:
            proc.append_turn(token_ids)
        else:
            proc.token_ids.extend(token_ids)
        if variant(proc.num_prompt_tokens, proc.num_tokens) != before and (proc.block_ids or proc.host_block_ids):
            self.block_manager.free(proc)
            proc.num_computed_tokens = 0
            proc.num_recomputes += 1

    def _finish_reason(self, proc: Process, token_id: int) -> str | None:
        cfg = self.config
        if token_id in proc.stop_token_ids or (token_id in cfg.eos_token_ids and not proc.ignore_eos):
            return "stop"
        if proc.num_output_tokens >= proc.max_tokens or proc.num_tokens >= cfg.max_model_len:
            return "length"
        quota = self.shares.quota(proc.uid)
        if quota is not None and self.block_manager.blocks_for_seq(proc.num_tokens) > quota:
            return "quota"          # its next step could never fit, even alone
        return None

    def _end_turn(self, proc: Process, reason: str) -> None:
        """Interactive processes with room left wait for input with their KV; others exit."""
        proc.finish_reason = reason
        if proc.interactive and proc.num_tokens < self.config.max_model_len - 1 and reason != "quota":
            proc.state, proc.stopped_from, proc.wait = ProcState.BLOCKED, None, Wait.INPUT
        else:
            self._exit(proc, reason)

    def _exit(self, proc: Process, reason: str) -> None:
        self.block_manager.free(proc)
        proc.exit(reason)

    # ----- controls for syscall handlers (between steps) -----
    def finish(self, pid: int, reason: str) -> bool:
        """End the current turn now (stop string, TERM); False if no turn is running
        (BLOCKED or ZOMBIE: e.g. the same token already ended it), which changes nothing."""
        proc = self.get(pid)
        if proc.state in (ProcState.BLOCKED, ProcState.ZOMBIE):
            return False
        self._end_turn(proc, reason)
        return True

    def kill(self, pid: int) -> None:
        """Exit now with reason "killed", freeing all KV. Killing a zombie does nothing."""
        proc = self.get(pid)
        if proc.is_alive:
            self._exit(proc, "killed")

    def stop(self, pid: int) -> None:
        self._alive(pid).stop()

    def cont(self, pid: int) -> None:
        self._alive(pid).cont()

    def set_nice(self, pid: int, nice: int) -> None:
        if not NICE_MIN <= nice <= NICE_MAX:
            raise ValueError(f"nice must be in [{NICE_MIN}, {NICE_MAX}], got {nice}")
        self._alive(pid).nice = nice

    def fork(self, pid: int, child: Process) -> Process:
        """Add ``child`` (new pid, own sampling) as a copy of ``pid``'s token state sharing
        its full KV blocks; a partial last block is copied by the next plan's ``copies``."""
        parent = self._alive(pid)
        if child.pid in self.pids:
            raise ValueError(f"pid {child.pid} already exists")
        child.ppid, child.model, child.adapter = parent.pid, parent.model, parent.adapter
        child.token_ids = list(parent.token_ids)
        child.num_prompt_tokens, child.turn_start = parent.num_prompt_tokens, parent.turn_start
        child.block_ids, child.host_block_ids = [], []
        room = self.shares.quota_room(child.uid)
        self.pending_copies += self.block_manager.fork(parent, child, may_copy=room is None or room >= 1)
        blocked = parent.state is ProcState.BLOCKED
        child.state, child.wait = (ProcState.BLOCKED, Wait.INPUT) if blocked else (ProcState.READY, None)
        child.finish_reason = parent.finish_reason if child.state is ProcState.BLOCKED else None
        self._admit(child)
        return child

    def append_input(self, pid: int, token_ids: list[int]) -> None:
        """Start a new turn of a BLOCKED interactive process; its KV is kept."""
        proc = self._alive(pid)
        if proc.state is not ProcState.BLOCKED:
            raise ValueError(f"process {pid} is {proc.state.value}, not awaiting input")
        if not token_ids:
            raise ValueError("no input tokens")
        if proc.num_tokens + len(token_ids) >= self.config.max_model_len:
            raise ValueError(f"input would exceed max_model_len {self.config.max_model_len}")
        self._grow(proc, token_ids, turn=True)
        proc.wait = None
        proc.state = ProcState.SWAPPED if proc.host_block_ids else ProcState.READY

    def detach(self, pid: int) -> Process:
        """Take a process out of this scheduler because its model is leaving the device: all
        its KV is freed (preempted for recompute: output stays exact) and it is no longer
        scheduled here. Returns the PCB, state unchanged; ``add`` it again to resume."""
        proc = self.get(pid)
        if proc.is_alive:
            self.block_manager.free(proc)
            proc.num_computed_tokens = 0
            proc.num_preemptions += 1
            proc.num_recomputes += 1
        del self.pids[pid]
        return proc

    def release(self, pid: int) -> Process:
        """Reap a zombie: take it off the run queue and return its PCB."""
        proc = self.get(pid)
        if proc.is_alive:
            raise ValueError(f"process {pid} is still {proc.state.value}")
        del self.pids[pid]
        return proc

    def set_kv_quota(self, uid: int, max_blocks: int | None) -> None:
        """One user's KV quota (None: the default); see ``tenancy.Shares``."""
        if max_blocks is None:
            self.shares.kv_quotas.pop(uid, None)
        elif max_blocks < 1:
            raise ValueError("a KV quota must be >= 1 block")
        else:
            self.shares.kv_quotas[uid] = max_blocks

    def meminfo(self) -> dict:
        info = self.block_manager.meminfo(self._queued())
        info["procs_by_state"] = {s.value: 0 for s in ProcState}
        for proc in self._queued():
            info["procs_by_state"][proc.state.value] += 1
        return info
