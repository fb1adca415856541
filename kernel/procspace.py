"""The process space: everything the kernel holds about processes.

``ProcSpace`` owns the model driver, the scheduler (which holds the process table) and each
process's I/O state; the kernel loop calls ``schedule``/``update``/``deliver`` on it, and the
handlers in ``sysproc`` use its lookups.
"""
from __future__ import annotations

import logging
import math
import secrets
import time

from llmos.drivers.batch import SamplingParams, StepPlan, StepResult
from llmos.kernel.procio import ProcIO, Waiter
from llmos.syscalls.errors import SyscallError

log = logging.getLogger("llmos.kernel")
_SIG_REASON = {"TERM": "terminated", "KILL": "killed"}


class ProcSpace:
    def __init__(self, kernel, models=None):
        self.k = kernel
        self.cfg = kernel.cfg
        self.device = self.driver = self.sched = None
        self.io: dict[int, ProcIO] = {}
        self.next_pid = 1
        self.idle = True
        if self.cfg.model is not None:
            self._boot_model()

    def _boot_model(self) -> None:
        from llmos.drivers.default_model import ensure_default_model
        from llmos.drivers.device import detect
        from llmos.drivers.model import ModelDriver
        from llmos.kernel.scheduler import Scheduler, SchedulerConfig
        cfg = self.cfg
        self.device = detect(cfg.device)
        self.random_weights = cfg.model == "default"
        path = ensure_default_model(cfg.state_dir) if self.random_weights else cfg.model
        self.driver = ModelDriver(path, self.device, cfg.dtype, cfg.block_size)
        per_block = self.driver.kv_bytes_per_block()
        # Never more than every sequence at full context could use; on CPU that cap decides.
        cap = cfg.max_num_seqs * math.ceil(self.driver.max_model_len / cfg.block_size)
        num_blocks = cfg.kv_blocks or max(16, min(cap, int(self.device.free_bytes() * cfg.kv_fraction) // per_block))
        num_host = cfg.host_kv_blocks if cfg.host_kv_blocks is not None else num_blocks
        # A lone process must always fit in the pool, so the context window is at most the pool.
        self.max_model_len = min(self.driver.max_model_len, num_blocks * cfg.block_size)
        self.driver.allocate_kv(num_blocks, num_host)
        self.sched = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, num_host_blocks=num_host, block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=self.max_model_len, preempt_mode=cfg.preempt_mode,
            eos_token_ids=frozenset(self.driver.eos_token_ids)))
        log.info("model %s on %s: %d KV blocks (%d bytes each), %d host blocks",
                 self.driver.name, self.device.name, num_blocks, per_block, num_host)

    # -- the loop's calls ---------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        if self.sched is None:
            return None
        plan = self.sched.schedule()
        self.idle = plan.is_empty
        return plan

    def notify_preempted(self, plan: StepPlan) -> None:
        """Tell each process losing its device KV, before the driver moves it."""
        for pid, mode in plan.preempted:
            self._event(pid, {"event": "preempted", "mode": mode})

    def update(self, plan: StepPlan, result: StepResult) -> list:
        self.k.stats.steps += 1
        self.k.stats.tokens_generated += len(result.sampled)
        return self.sched.update(plan, result)

    def deliver(self, events) -> None:
        for ev in events:
            io = self.io.get(ev.pid)
            if io is None:
                continue
            if ev.kind == "token" and not io.turn_done:
                if io.append(ev.token_id):
                    self.sched.finish(ev.pid, "stop")
                    self.turn_done(ev.pid, "stop")
                else:
                    self._stream(ev.pid, final=False)
            elif ev.kind == "finished" and not io.turn_done:
                self.turn_done(ev.pid, ev.reason)
            elif ev.kind == "resumed":     # "preempted" was told from the plan, before the move
                io.events.append({"event": "resumed"})

    def has_work(self) -> bool:
        return not self.idle

    def idle_timeout_ms(self) -> int:
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
        io, proc = self.io[pid], self.sched.get(pid)
        io.turn_done, io.finish_reason = True, reason
        final = {**io.pending_chunk(final=True), "finish_reason": reason, "events": io.events}
        for w in [w for w in io.waiters if w.kind == "read"]:
            self.k.reply(w.call, final, more=False)
        io.waiters = [w for w in io.waiters if w.kind != "read"]
        if proc.interactive and io.close_after_turn and proc.is_alive:
            self.sched.kill(pid)
        if not proc.is_alive:
            waits = [w for w in io.waiters if w.kind == "wait"]
            if waits:
                self.k.reply(waits[0].call, self.reap(pid, answered=waits[0]))

    def reap(self, pid: int, answered: Waiter | None = None) -> dict:
        """Remove a ZOMBIE for good and return its result; other waiters learn it is gone."""
        io, proc = self.io.pop(pid), self.sched.get(pid)
        result = io.result(pid, proc)
        for w in io.waiters:
            if w is not answered:
                self.k.send_error(w.call.identity, w.call.rid, SyscallError("ESRCH", f"process {pid} reaped"))
        self.sched.release(pid)
        return result

    def _event(self, pid: int, event: dict) -> None:
        io = self.io.get(pid)
        if io is None:
            return
        io.events.append(event)
        for w in io.waiters:
            if w.kind == "read":
                self.k.reply(w.call, {"text": "", "token_ids": [], **event}, more=True)

    # -- lookups for handlers -----------------------------------------------------------------
    def require_model(self, name: str | None) -> None:
        if self.driver is None:
            raise SyscallError("ENOENT", "this kernel runs without a model (--model none)")
        if name not in (None, "default", self.driver.name):
            raise SyscallError("ENOENT", f"unknown model {name!r}; loaded: {self.driver.name!r}")

    def get(self, call, pid: int):
        """The caller's process ``pid``; another user's is as invisible as a missing one."""
        proc = self.sched.procs.get(pid) if self.sched is not None else None
        if proc is None or pid not in self.io or (proc.uid != call.user.uid and not call.user.is_root):
            raise SyscallError("ESRCH", f"no process {pid}")
        return proc

    def visible(self, call, everyone: bool = False) -> list:
        if self.sched is None:
            return []
        return [p for pid, p in sorted(self.sched.procs.items()) if pid in self.io
                and (p.uid == call.user.uid or (call.user.is_root and everyone))]

    def count_by_state(self) -> dict:
        if self.sched is None:
            return {}
        counts: dict[str, int] = {}
        for p in self.sched.procs.values():
            counts[p.state.name] = counts.get(p.state.name, 0) + 1
        return counts

    def device_name(self) -> str:
        return self.device.name if self.device is not None else "none"

    def model_list(self) -> list[dict]:
        if self.driver is None:
            return []
        return [{"name": self.driver.name, "architecture": self.driver.architecture,
                 "params": self.driver.num_params, "dtype": self.driver.dtype,
                 "random_weights": self.random_weights}]

    def devinfo(self) -> dict | None:
        return self.device.info() if self.device is not None else None

    def new_pid(self) -> int:
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        return pid

    def tokens_for(self, args: dict, prompt_key: str = "prompt", ids_key: str = "prompt_ids") -> list[int]:
        given = [k for k in (prompt_key, "messages", ids_key) if args.get(k) is not None]
        if len(given) != 1:
            raise SyscallError("EINVAL", f"give exactly one of {prompt_key}, messages, {ids_key}")
        d = self.driver
        if given[0] == prompt_key:
            ids = d.encode(args[prompt_key])
        elif given[0] == "messages":
            msgs = args["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in msgs):
                raise SyscallError("EINVAL", "messages must be [{role: str, content: str}, ...]")
            ids = d.apply_chat_template(msgs)
        else:
            ids = args[ids_key]
            vocab = d.config.vocab_size
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise SyscallError("EINVAL", f"{ids_key} must be token ids in [0, {vocab})")
        if not ids:
            raise SyscallError("EINVAL", "empty input")
        return list(ids)


def random_seed() -> int:
    return secrets.randbits(63)
