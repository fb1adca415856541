"""The process manager: what happens to processes outside the batch.

It starts processes (queued on their model's scheduler, or BLOCKED on a page fault), delivers
signals by one path whether or not a process's model is on the device, ends turns and reaps,
turns each step's events into streamed frames and answers, and moves processes off and back
onto schedulers as their model leaves the device and returns (``park``, ``admit_loaded``).

Invariant: while a model is on the device every live process of it is queued on its
scheduler; while it is not, none is, and those that want to run are BLOCKED on ``Wait.MODEL``.

It is given the process table, the model manager, the outbox and the metrics — never the
kernel — and sends nothing itself: every frame goes into the outbox.
"""
from __future__ import annotations

import logging
import time
from enum import Enum
from typing import Callable

from llmos.drivers import text
from llmos.drivers.batch import StepPlan, StepResult
from llmos.kernel import objects
from llmos.kernel.models import Engine, ModelEntry, Where
from llmos.kernel.proc import Process, ProcState, Wait
from llmos.kernel.procio import ProcIO, Waiter, WaitKind
from llmos.kernel.scheduler import EventKind, Scheduler
from llmos.syscalls.errors import SyscallError

log = logging.getLogger("llmos.kernel")


class Signal(Enum):
    TERM = "TERM"            # end it (finish reason "terminated")
    KILL = "KILL"            # end it (finish reason "killed")
    STOP = "STOP"            # pause it; its KV is the first taken under pressure
    CONT = "CONT"            # resume a STOPPED process
    INT = "INT"              # end the current turn (interactive); others as TERM


class ProcManager:
    def __init__(self, cfg, table, models, default: ModelEntry | None, outbox, metrics, stats):
        self.cfg = cfg
        self.table = table                      # kernel.proctable.ProcTable
        self.models = models                    # ModelManager, None with --model none
        self.default = default
        self.outbox = outbox
        self.metrics = metrics
        self.stats = stats
        self.load_waiters: dict[str, list[Callable]] = {}    # model name -> model_load answers
        self.timed: set[int] = set()            # pids with a waiter that has a deadline

    # -- lookups ------------------------------------------------------------------------------
    def entry(self, name: str | None) -> ModelEntry:
        if self.models is None:
            raise SyscallError("ENOENT", "this kernel runs without models (--model none)")
        if name in (None, "default"):
            return self.default
        return self.models.resolve(name)

    def engines(self) -> list[Engine]:
        return self.models.engines() if self.models is not None else []

    def sched_of(self, proc: Process) -> Scheduler | None:
        """The scheduler ``proc`` is queued on, None while its model is off the device."""
        engine = proc.entry.engine if proc.entry is not None else None
        return engine.sched if engine is not None and proc.pid in engine.sched.pids else None

    # -- starting -----------------------------------------------------------------------------
    def start(self, proc: Process, entry: ModelEntry, stop: tuple[str, ...] = (),
              kg_facts: list[str] = ()) -> None:
        """Put a new process in the table: queued on its model's scheduler, or BLOCKED on a page
        fault while the model loads (``models.fault`` may refuse with ENOMEM: nothing is kept)."""
        resident = self.models.fault(entry, nice=proc.nice)
        if resident and proc.adapter is not None:
            self.ensure_adapter(entry.engine, proc.adapter)
        entry.nice = proc.nice
        proc.entry = entry
        proc.io = ProcIO(decode=lambda ids, tok=entry.tokenizer: text.decode(tok, ids), stop=stop,
                         kg_facts=list(kg_facts))
        self.table.add(proc)
        if resident:
            entry.engine.sched.add(proc)
        else:
            proc.block(Wait.MODEL)

    def ensure_adapter(self, engine: Engine, adapter: str) -> None:
        """Make a LoRA adapter known to this model's driver (``objects.load_adapter``)."""
        objects.load_adapter(self.models, engine, adapter)

    def fork(self, parent: Process, child: Process) -> None:
        """``child`` (a fresh record) becomes a copy of ``parent`` sharing its KV copy-on-write."""
        sched = self.sched_of(parent)
        if sched is None:
            raise SyscallError("EBUSY", f"process {parent.pid} is waiting for model {parent.entry.name!r}")
        pio = parent.io
        child.entry = parent.entry
        child.io = ProcIO(decode=pio.decode, stop=pio.stop, turn_ids=list(pio.turn_ids), text=pio.text,
                          turn_done=pio.turn_done, finish_reason=pio.finish_reason)
        self.table.add(child)
        try:
            sched.fork(parent.pid, child)
        except (KeyError, ValueError) as exc:
            self.table.remove(child.pid)
            raise SyscallError("EBUSY", str(exc))

    # -- signals: one path, wherever the model is ---------------------------------------------
    def signal(self, proc: Process, sig: Signal) -> None:
        if not proc.is_alive:
            raise SyscallError("ESRCH", f"process {proc.pid} has exited (reap it with wait)")
        if sig is Signal.INT and not proc.interactive:
            sig = Signal.TERM
        if sig is Signal.STOP:
            proc.stop()
        elif sig is Signal.CONT:
            proc.cont()
        elif sig is Signal.INT:
            if self.end_turn(proc, "interrupted"):
                self.turn_done(proc, "interrupted")
        else:
            self.terminate(proc, "terminated" if sig is Signal.TERM else "killed")

    def terminate(self, proc: Process, reason: str, announce: bool = True) -> None:
        """End ``proc`` now, freeing its KV. ``announce``: its turn ends with ``reason`` (readers
        get the final frame, a waiter the result); else its last turn's answer stands."""
        sched = self.sched_of(proc)
        if sched is not None:
            sched.kill(proc.pid)
        elif proc.is_alive:
            proc.exit(reason)
        proc.finish_reason = reason
        if announce:
            self.turn_done(proc, reason)

    def end_turn(self, proc: Process, reason: str) -> bool:
        """End the running turn (an interactive process then waits for input, keeping its KV);
        False when no turn runs (it already ended: e.g. the same token finished it)."""
        sched = self.sched_of(proc)
        if sched is not None:
            return sched.finish(proc.pid, reason)
        if proc.wait is Wait.INPUT or not proc.is_alive:
            return False
        proc.finish_reason = reason             # its model is away: nothing to free
        if proc.interactive:
            proc.block(Wait.INPUT)
        else:
            proc.exit(reason)
        return True

    def write(self, proc: Process, ids: list[int]) -> None:
        """A new turn of an interactive process waiting for input (a refusal changes nothing)."""
        sched = self.sched_of(proc)
        if sched is not None:
            try:
                sched.append_input(proc.pid, ids)
            except ValueError as exc:
                raise SyscallError("EBUSY", str(exc))
        else:                                   # its model left the device: a page fault
            self.models.fault(proc.entry, nice=proc.nice)     # may refuse (ENOMEM)
            proc.append_turn(ids)
            proc.block(Wait.MODEL)
        proc.io.new_turn()

    # -- model residency ----------------------------------------------------------------------
    def park(self, entry: ModelEntry, nice: int) -> bool:
        """The model manager wants ``entry``'s device memory for a process of priority ``nice``:
        if every live process of ``entry`` is less important, take them off its scheduler (KV
        dropped for recompute; each is told first) to wait for their model like a page fault."""
        sched = entry.engine.sched
        procs = [self.table.procs[pid] for pid in sched.pids]
        if any(p.nice <= nice for p in procs if p.is_alive):
            return False
        for proc in procs:
            sched.detach(proc.pid)
            if proc.is_alive:
                self._event(proc, {"event": "preempted", "mode": "recompute"})
                if proc.wait is not Wait.INPUT:
                    proc.block(Wait.MODEL)
        return True

    def on_loaded(self, entry: ModelEntry, answer: Callable) -> None:
        """Call ``answer(error_or_None)`` when ``entry``'s load ends (``model_load``)."""
        self.load_waiters.setdefault(entry.name, []).append(answer)

    def admit_loaded(self) -> None:
        """Models that finished loading get every live process of theirs back on their new
        scheduler; those that waited for it run. A failed load ends the waiting ones."""
        if self.models is None or not (self.load_waiters or any(
                e.loading for e in self.models.entries.values())):
            return
        for done in self.models.poll_loads():
            entry = done.entry
            for answer in self.load_waiters.pop(entry.name, []):
                answer(done.error)
            for proc in [p for p in self.table.of_model(entry) if p.is_alive]:
                if done.error is not None:
                    if proc.waits_for_model:
                        self.fail(proc, done.error.message)
                elif len(proc.token_ids) >= entry.engine.max_model_len:
                    self.fail(proc, "prompt longer than the model's KV pool")
                else:
                    self._readmit(entry.engine, proc)

    def _readmit(self, engine: Engine, proc: Process) -> None:
        try:
            if proc.adapter is not None:
                self.ensure_adapter(engine, proc.adapter)
        except SyscallError as err:
            self.fail(proc, err.message)
            return
        engine.sched.attach(proc)
        if proc.wait is Wait.MODEL:
            proc.wake()

    def retry_faulted(self) -> None:
        """Models that were waiting for room may fit now (a process ended, a lease came back).
        Every live process of a model off the device wants it back, also one between turns (so
        its next turn need not wait for a load)."""
        if self.models is None or all(e.where is Where.DEVICE or e.loading for e in self.models.entries.values()):
            return
        waiting: dict[ModelEntry, int] = {}
        for proc in self.table.procs.values():
            if proc.is_alive and proc.entry.where is not Where.DEVICE:
                waiting[proc.entry] = min(waiting.get(proc.entry, proc.nice), proc.nice)
        self.models.retry_waiting(waiting)

    # -- the step -----------------------------------------------------------------------------
    def notify_preempted(self, plan: StepPlan) -> None:
        """Tell each process losing its device KV, before the driver moves it."""
        for pid, mode in plan.preempted:
            self._event(self.table.procs[pid], {"event": "preempted", "mode": mode})

    def update(self, engine: Engine, plan: StepPlan, result: StepResult) -> list:
        self.stats.steps += 1
        self.stats.tokens_generated += len(result.sampled)
        self.models.entries[engine.name].last_used = time.monotonic()
        return engine.sched.update(plan, result)

    def deliver(self, engine: Engine, events) -> None:
        now, metrics = time.monotonic(), self.metrics
        for ev in events:
            proc = self.table.procs.get(ev.pid)
            if proc is None:
                continue
            io = proc.io
            if ev.kind is EventKind.TOKEN and not io.turn_done:
                if io.last_token_at is None:
                    metrics.first_token(proc.nice, now - io.turn_started_at)
                else:
                    metrics.next_token(proc.nice, now - io.last_token_at)
                io.last_token_at = now
                if io.append(ev.token_id):
                    engine.sched.finish(ev.pid, "stop")
                    self.turn_done(proc, "stop")
                else:
                    self._stream(proc, final=False)
            elif ev.kind is EventKind.FINISHED and not io.turn_done:
                self.turn_done(proc, ev.reason)
            elif ev.kind is EventKind.RESUMED:   # "preempted" was told from the plan, before the move
                io.events.append({"event": "resumed"})

    def fail(self, proc: Process, message: str) -> None:
        """End a process because of an error that is not its fault; it keeps its output so far."""
        if proc.is_alive:
            self.terminate(proc, "error", announce=False)
        self._event(proc, {"event": "error", "message": message})
        self.turn_done(proc, "error")

    def fail_plan(self, engine: Engine, plan: StepPlan, exc: Exception) -> None:
        """A step raised: end the processes it carried, keep the kernel and everyone else going."""
        log.error("step on %s failed: %s", engine.name, exc, exc_info=True)
        # Its chunks, and what it was moving: that KV may not have moved, so it cannot be trusted.
        for pid in [c.pid for c in plan.chunks] + [pid for pid, _ in plan.preempted]:
            proc = self.table.procs.get(pid)
            if proc is not None and not proc.io.turn_done:
                self.fail(proc, f"the model step failed: {type(exc).__name__}: {exc}"[:300])

    # -- answers ------------------------------------------------------------------------------
    def turn_done(self, proc: Process, reason: str) -> None:
        io = proc.io
        io.turn_done, io.finish_reason = True, reason
        at = io.num_streamed_ids, io.num_streamed_chars
        final = {**io.pending_chunk(final=True), "finish_reason": reason, "events": io.events}
        for w in [w for w in io.waiters if w.kind is WaitKind.READ]:
            self.outbox.reply(w.call, w.unseen(final, *at), more=False)
        io.waiters = [w for w in io.waiters if w.kind is not WaitKind.READ]
        if proc.interactive and io.close_after_turn and proc.is_alive:
            self.terminate(proc, reason, announce=False)
        if not proc.is_alive:
            waits = [w for w in io.waiters if w.kind is WaitKind.WAIT]
            if waits:
                self.outbox.reply(waits[0].call, self.reap(proc, answered=waits[0]))

    def reap(self, proc: Process, answered: Waiter | None = None) -> dict:
        """Remove a ZOMBIE for good and return its result; other waiters learn it is gone."""
        assert not proc.is_alive, f"reaping live pid {proc.pid}"
        io = proc.io
        result = io.result(proc.pid, proc)
        self.metrics.retire(proc)
        for w in io.waiters:
            if w is not answered:
                self.outbox.fail(w.call, SyscallError("ESRCH", f"process {proc.pid} reaped"))
        io.waiters = []
        self.timed.discard(proc.pid)
        sched = self.sched_of(proc)
        if sched is not None:
            sched.release(proc.pid)
        self.table.remove(proc.pid)
        self.retry_faulted()
        return result

    def add_waiter(self, proc: Process, waiter: Waiter) -> None:
        proc.io.waiters.append(waiter)
        if waiter.deadline is not None:
            self.timed.add(proc.pid)

    def _stream(self, proc: Process, final: bool) -> None:
        io = proc.io
        at = io.num_streamed_ids, io.num_streamed_chars
        chunk = io.pending_chunk(final)
        if chunk is None:
            return
        for w in io.waiters:
            if w.kind is WaitKind.READ:
                part = w.unseen(chunk, *at)
                if part["token_ids"] or part["text"]:
                    self.outbox.reply(w.call, part, more=True)

    def _event(self, proc: Process, event: dict) -> None:
        proc.io.events.append(event)
        for w in proc.io.waiters:
            if w.kind is WaitKind.READ:
                self.outbox.reply(w.call, {"text": "", "token_ids": [], **event}, more=True)

    def num_to_drain(self) -> int:
        """Live non-interactive processes that will still end by themselves (not STOPPED)."""
        return sum(1 for p in self.table.procs.values()
                   if p.is_alive and not p.interactive and p.state is not ProcState.STOPPED)

    def idle_timeout_ms(self) -> int:
        if self.models is not None and any(e.loading for e in self.models.entries.values()):
            return 5                        # a page fault is being served: look for it soon
        deadlines = [w.deadline for pid in self.timed for w in self.table.procs[pid].io.waiters if w.deadline]
        if not deadlines:
            return 100
        return max(0, min(100, int((min(deadlines) - time.monotonic()) * 1000) + 1))

    def expire_waiters(self) -> None:
        now = time.monotonic()
        for pid in list(self.timed):
            proc = self.table.procs[pid]
            for w in proc.io.expired(now):
                self.outbox.fail(w.call, SyscallError("ETIMEDOUT", f"process {proc.pid} did not end in time"))
            if not any(w.deadline for w in proc.io.waiters):
                self.timed.discard(pid)

    def shutdown(self) -> None:
        for proc in self.table.procs.values():
            for w in proc.io.waiters:
                self.outbox.fail(w.call, SyscallError("ECANCELED", "kernel shutting down"))
            proc.io.waiters = []
