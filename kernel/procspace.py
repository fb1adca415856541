"""The process space: everything the kernel holds about processes.

``ProcSpace`` owns the device, the model manager (each resident model is an engine with its
own driver, KV pool and scheduler), the processes waiting for their model to load (page
faults), and each process's I/O state. The kernel loop steps every engine with work; the
handlers in ``sysproc`` and ``sysmodel`` use the lookups here.
"""
from __future__ import annotations

import logging
import math
import secrets
import time

from llmos.drivers import text
from llmos.drivers.batch import StepPlan, StepResult
from llmos.kernel import objects, sysmodel
from llmos.kernel.models import Engine, ModelEntry, ModelManager
from llmos.kernel.proc import ProcState
from llmos.kernel.procio import ProcIO, Waiter
from llmos.syscalls.errors import SyscallError

log = logging.getLogger("llmos.kernel")
DEFAULT_NAME = "llmos-tiny-random"


class ProcSpace:
    def __init__(self, kernel):
        self.k = kernel
        self.cfg = kernel.cfg
        self.device = None
        self.models: ModelManager | None = None
        self.default: ModelEntry | None = None
        self.io: dict[int, ProcIO] = {}
        self.model_of: dict[int, ModelEntry] = {}        # pid -> its model
        self.faulted: dict[int, object] = {}             # pid -> Process waiting for its model
        self.load_waiters: dict[str, list] = {}          # model name -> model_load calls
        self.parked_state: dict[int, ProcState] = {}     # pid -> its state when its model left
        self.next_pid = 1
        if self.cfg.model is not None:
            self._boot()

    def _boot(self) -> None:
        from llmos.drivers.default_model import ensure_default_model
        from llmos.drivers.device import detect
        cfg = self.cfg
        self.device = detect(cfg.device)
        self.models = ModelManager(cfg, self.device, self._make_engine, self._park)
        builtin = cfg.model == "default"
        name = DEFAULT_NAME if builtin else cfg.model
        path = ensure_default_model(cfg.state_dir) if builtin else cfg.model
        entry = self.models.entries.setdefault(name, ModelEntry(name, path, random_weights=builtin))
        error = self.models.load_now(entry)
        if error is not None:
            raise SystemExit(f"llmos: {error.message}")
        self.default = entry

    def _make_engine(self, entry: ModelEntry, driver, free_bytes: int) -> Engine:
        from llmos.kernel.scheduler import Scheduler, SchedulerConfig
        cfg = self.cfg
        per_block = driver.kv_bytes_per_block()
        # Never more than every sequence at full context could use; on CPU that cap decides.
        cap = cfg.max_num_seqs * math.ceil(driver.max_model_len / cfg.block_size)
        num_blocks = cfg.kv_blocks or max(16, min(cap, int(free_bytes * cfg.kv_fraction) // per_block))
        num_host = cfg.host_kv_blocks if cfg.host_kv_blocks is not None else num_blocks
        # A lone process must always fit in the pool, so the context window is at most the pool.
        max_len = min(driver.max_model_len, num_blocks * cfg.block_size)
        driver.allocate_kv(num_blocks, num_host)
        sched = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, num_host_blocks=num_host, block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=max_len, preempt_mode=cfg.preempt_mode,
            eos_token_ids=frozenset(driver.eos_token_ids), max_adapters_per_step=cfg.adapter_slots))
        log.info("model %s on %s: %d KV blocks (%d bytes each), %d host blocks, attention backend %s",
                 entry.name, self.device.name, num_blocks, per_block, num_host, driver.backend.name)
        return Engine(entry.name, driver, sched, max_len, num_blocks * per_block)

    # -- the loop's calls ---------------------------------------------------------------------
    def engines(self) -> list[Engine]:
        return self.models.engines() if self.models is not None else []

    def admit_loaded(self) -> None:
        """Processes whose model finished loading start running; failed loads end them."""
        if self.models is None or not (self.faulted or self.load_waiters or any(
                e.loading for e in self.models.entries.values())):
            return
        for done in self.models.poll_loads():
            entry = done.entry
            for call in self.load_waiters.pop(entry.name, []):
                if done.error:
                    self.k.send_error(call.identity, call.rid, done.error)
                else:
                    self.k.reply(call, sysmodel.models_row(self, entry, call.user))   # [objects]
            for pid, proc in list(self.faulted.items()):
                if self.model_of[pid] is not entry or not proc.is_alive:
                    continue
                if done.error or len(proc.token_ids) >= entry.engine.max_model_len:
                    msg = done.error.message if done.error else "prompt longer than the model's KV pool"
                    self.fail(pid, msg)             # a ZOMBIE in ``faulted`` until reaped
                else:
                    try:
                        if proc.adapter is not None:
                            self.ensure_adapter(entry.engine, proc.adapter)
                    except SyscallError as err:
                        self.fail(pid, err.message)
                        continue
                    del self.faulted[pid]
                    self._readmit(entry.engine, proc)

    def _park(self, entry: ModelEntry, nice: int) -> bool:
        """The model manager wants ``entry``'s device memory for a process of priority ``nice``:
        if every live process of ``entry`` is less important, preempt them all for recompute
        (each is told first) and let them wait for their model like a page fault."""
        sched = entry.engine.sched
        if any(p.nice <= nice for p in sched.procs.values() if p.is_alive):
            return False
        for pid, proc in list(sched.procs.items()):
            if proc.is_alive:
                self._event(pid, {"event": "preempted", "mode": "recompute"})
                self.parked_state[pid] = proc.state
            sched.detach(pid)
            if proc.is_alive:
                proc.state = ProcState.BLOCKED
            self.faulted[pid] = proc
        return True

    def _readmit(self, engine: Engine, proc) -> None:
        """Back on its model's scheduler, in the state it was parked in (if it was parked)."""
        prior = self.parked_state.pop(proc.pid, None)
        engine.sched.add(proc)
        if prior is ProcState.STOPPED:
            engine.sched.stop(proc.pid)
        elif prior is ProcState.BLOCKED:        # an interactive process between turns
            engine.sched.finish(proc.pid, self.io[proc.pid].finish_reason or "stop")
        engine.idle = False

    def fail(self, pid: int, message: str) -> None:
        """End a process because of an error that is not its fault; it keeps its output so far."""
        proc = self.proc(pid)
        if pid in self.faulted:
            proc.state = ProcState.ZOMBIE
        elif proc.is_alive:
            self.sched_of(pid).kill(pid)
        self._event(pid, {"event": "error", "message": message})
        self.turn_done(pid, "error")

    def fail_plan(self, engine: Engine, plan: StepPlan, exc: Exception) -> None:
        """A step raised: end the processes it carried, keep the kernel and everyone else going."""
        log.error("step on %s failed: %s", engine.name, exc, exc_info=True)
        # Its chunks, and what it was moving: that KV may not have moved, so it cannot be trusted.
        for pid in [c.pid for c in plan.chunks] + [pid for pid, _ in plan.preempted]:
            if pid in self.io and self.proc(pid) is not None and not self.io[pid].turn_done:
                self.fail(pid, f"the model step failed: {type(exc).__name__}: {exc}"[:300])

    def notify_preempted(self, plan: StepPlan) -> None:
        """Tell each process losing its device KV, before the driver moves it."""
        for pid, mode in plan.preempted:
            self._event(pid, {"event": "preempted", "mode": mode})

    def update(self, engine: Engine, plan: StepPlan, result: StepResult) -> list:
        self.k.stats.steps += 1
        self.k.stats.tokens_generated += len(result.sampled)
        self.models.entries[engine.name].last_used = time.monotonic()
        return engine.sched.update(plan, result)

    def deliver(self, engine: Engine, events) -> None:
        now, metrics = time.monotonic(), self.k.metrics
        for ev in events:
            io = self.io.get(ev.pid)
            if io is None:
                continue
            if ev.kind == "token" and not io.turn_done:
                nice = engine.sched.procs[ev.pid].nice
                if io.last_token_at is None:
                    metrics.first_token(nice, now - io.turn_started_at)
                else:
                    metrics.next_token(nice, now - io.last_token_at)
                io.last_token_at = now
                if io.append(ev.token_id):
                    engine.sched.finish(ev.pid, "stop")
                    self.turn_done(ev.pid, "stop")
                else:
                    self._stream(ev.pid, final=False)
            elif ev.kind == "finished" and not io.turn_done:
                self.turn_done(ev.pid, ev.reason)
            elif ev.kind == "resumed":     # "preempted" was told from the plan, before the move
                io.events.append({"event": "resumed"})

    def has_work(self) -> bool:
        return any(not e.idle for e in self.engines())

    def idle_timeout_ms(self) -> int:
        if self.models is not None and any(e.loading for e in self.models.entries.values()):
            return 5                        # a page fault is being served: look for it soon
        deadlines = [w.deadline for io in self.io.values() for w in io.waiters if w.deadline]
        if not deadlines:
            return 100
        return max(0, min(100, int((min(deadlines) - time.monotonic()) * 1000) + 1))

    def expire_waiters(self) -> None:
        now = time.monotonic()
        for pid, io in self.io.items():
            for w in io.expired(now):
                self.k.send_error(w.call.identity, w.call.rid,
                                  SyscallError("ETIMEDOUT", f"process {pid} did not end in time"))

    def shutdown(self) -> None:
        for pid, io in self.io.items():
            for w in io.waiters:
                self.k.send_error(w.call.identity, w.call.rid, SyscallError("ECANCELED", "kernel shutting down"))
            io.waiters.clear()

    # -- delivery helpers ---------------------------------------------------------------------
    def _stream(self, pid: int, final: bool) -> None:
        io = self.io[pid]
        chunk = io.pending_chunk(final)
        if chunk is None:
            return
        for w in io.waiters:
            if w.kind == "read":
                self.k.reply(w.call, chunk, more=True)

    def turn_done(self, pid: int, reason: str) -> None:
        io, proc = self.io[pid], self.proc(pid)
        io.turn_done, io.finish_reason = True, reason
        final = {**io.pending_chunk(final=True), "finish_reason": reason, "events": io.events}
        for w in [w for w in io.waiters if w.kind == "read"]:
            self.k.reply(w.call, final, more=False)
        io.waiters = [w for w in io.waiters if w.kind != "read"]
        if proc.interactive and io.close_after_turn and proc.is_alive:
            self.sched_of(pid).kill(pid)
        if not proc.is_alive:
            waits = [w for w in io.waiters if w.kind == "wait"]
            if waits:
                self.k.reply(waits[0].call, self.reap(pid, answered=waits[0]))

    def reap(self, pid: int, answered: Waiter | None = None) -> dict:
        """Remove a ZOMBIE for good and return its result; other waiters learn it is gone."""
        io, proc = self.io.pop(pid), self.proc(pid)
        result = io.result(pid, proc)
        self.k.metrics.retire(proc)
        for w in io.waiters:
            if w is not answered:
                self.k.send_error(w.call.identity, w.call.rid, SyscallError("ESRCH", f"process {pid} reaped"))
        entry = self.model_of.pop(pid)
        if self.faulted.pop(pid, None) is None:
            entry.engine.sched.release(pid)
        self.retry_faulted()
        return result

    def retry_faulted(self) -> None:
        """Models that were waiting for room may fit now (a process ended, a lease came back)."""
        if self.models is None:
            return
        waiting: dict[ModelEntry, int] = {}
        for p, proc in self.faulted.items():
            if proc.is_alive:
                e = self.model_of[p]
                waiting[e] = min(waiting.get(e, proc.nice), proc.nice)
        self.models.retry_waiting(waiting)

    def _event(self, pid: int, event: dict) -> None:
        io = self.io.get(pid)
        if io is None:
            return
        io.events.append(event)
        for w in io.waiters:
            if w.kind == "read":
                self.k.reply(w.call, {"text": "", "token_ids": [], **event}, more=True)

    # -- processes ----------------------------------------------------------------------------
    def start(self, proc, entry: ModelEntry, stop: tuple[str, ...] = ()) -> None:
        """Queue a new process: on its model's scheduler, or BLOCKED on a page fault."""
        self.model_of[proc.pid] = entry
        entry.nice = proc.nice
        self.io[proc.pid] = ProcIO(decode=lambda ids, tok=entry.tokenizer: text.decode(tok, ids), stop=stop)
        if self.models.fault(entry, nice=proc.nice):
            if proc.adapter is not None:
                try:
                    self.ensure_adapter(entry.engine, proc.adapter)
                except SyscallError:
                    del self.model_of[proc.pid], self.io[proc.pid]
                    raise
            entry.engine.sched.add(proc)
            entry.engine.idle = False
        else:
            proc.state = ProcState.BLOCKED
            self.faulted[proc.pid] = proc

    def ensure_adapter(self, engine: Engine, adapter: str) -> None:
        """Make a LoRA adapter known to this model's driver: by name if loaded, else from its
        directory (validated against the model: missing -> ENOENT, mismatched or corrupt -> EINVAL)."""
        objects.load_adapter(self.models, engine, adapter)                     # [objects]

    def proc(self, pid: int):
        if pid in self.faulted:
            return self.faulted[pid]
        entry = self.model_of.get(pid)
        return entry.engine.sched.procs.get(pid) if entry is not None and entry.engine else None

    def sched_of(self, pid: int):
        if pid in self.faulted:
            raise SyscallError("EBUSY", f"process {pid} is waiting for model {self.model_of[pid].name!r} to load")
        return self.model_of[pid].engine.sched

    def get(self, call, pid: int):
        """The caller's process ``pid``; another user's is as invisible as a missing one."""
        proc = self.proc(pid)
        if proc is None or pid not in self.io or (proc.uid != call.user.uid and not call.user.is_root):
            raise SyscallError("ESRCH", f"no process {pid}")
        return proc

    def all_procs(self) -> list:
        procs = [p for e in self.engines() for p in e.sched.procs.values()] + list(self.faulted.values())
        return sorted((p for p in procs if p.pid in self.io), key=lambda p: p.pid)

    def visible(self, call, everyone: bool = False) -> list:
        return [p for p in self.all_procs() if p.uid == call.user.uid or (call.user.is_root and everyone)]

    def count_by_state(self) -> dict:
        counts: dict[str, int] = {}
        for p in self.all_procs():
            counts[p.state.name] = counts.get(p.state.name, 0) + 1
        return counts

    def new_pid(self) -> int:
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        return pid

    # -- models -------------------------------------------------------------------------------
    def entry(self, name: str | None) -> ModelEntry:
        if self.models is None:
            raise SyscallError("ENOENT", "this kernel runs without models (--model none)")
        if name in (None, "default"):
            return self.default
        return self.models.resolve(name)

    def context_len(self, entry: ModelEntry) -> int:
        if entry.engine is not None:
            return entry.engine.max_model_len
        t = entry.config.get_text_config()
        return int(getattr(t, "max_position_embeddings", None) or getattr(t, "n_positions", None) or 2048)

    def device_name(self) -> str:
        return self.device.name if self.device is not None else "none"

    def devinfo(self) -> dict | None:
        return self.device.info() if self.device is not None else None

    def tokens_for(self, entry: ModelEntry, args: dict, prompt_key: str = "prompt",
                   ids_key: str = "prompt_ids") -> list[int]:
        given = [k for k in (prompt_key, "messages", ids_key) if args.get(k) is not None]
        if len(given) != 1:
            raise SyscallError("EINVAL", f"give exactly one of {prompt_key}, messages, {ids_key}")
        tok = entry.tokenizer
        if given[0] == prompt_key:
            ids = text.encode(tok, args[prompt_key])
        elif given[0] == "messages":
            msgs = args["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in msgs):
                raise SyscallError("EINVAL", "messages must be [{role: str, content: str}, ...]")
            ids = text.apply_chat_template(tok, msgs)
        else:
            ids = args[ids_key]
            vocab = entry.config.get_text_config().vocab_size
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise SyscallError("EINVAL", f"{ids_key} must be token ids in [0, {vocab})")
        if not ids:
            raise SyscallError("EINVAL", "empty input")
        return list(ids)


def random_seed() -> int:
    return secrets.randbits(63)
