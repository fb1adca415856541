"""The kernel: one process, one device, one loop.

    while running:
        drain_syscalls()                             # handlers answer or register waiters
        procs.admit_loaded()                         # processes whose model finished loading
        for each engine (a model on the device) with work:
            plan = scheduler.schedule()              # who runs this step (a value object)
            result = driver.execute(plan)            # one forward pass over the batch
            events = scheduler.update(plan, result)  # tokens appended, processes finished
            procs.deliver(events)                    # streamed tokens, answered waiters
        outbox.flush()                               # the one place that sends

Sockets belong to the I/O thread; this loop only reads and writes its inproc end, and every
frame it sends was put in the outbox (flushed after the syscalls and after the steps). A
handler never blocks: ``wait`` and ``read`` register a waiter that ``deliver`` answers later.

Admission is fair: each turn takes what the I/O thread has queued into one queue per caller
(user or service) and serves them round robin, so one client's flood of calls delays another's
by one call per turn, not by the flood.
"""
from __future__ import annotations

import logging
import secrets
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.utils.monitor

from llmos.kernel import audit, curve, engines, handlers, restore
from llmos.kernel.alerts import Alerts
from llmos.kernel.io import IOThread
from llmos.kernel.journal import Journal
from llmos.kernel.metrics import Metrics
from llmos.kernel.outbox import Outbox
from llmos.kernel.procio import PENDING_REPLY
from llmos.kernel.procmgr import ProcManager
from llmos.kernel.proctable import ProcTable
from llmos.kernel.security import RateLimiter, User, UserDB
from llmos.kernel.sessions import Sessions
from llmos.kernel.services import ServiceManager
from llmos.kernel.tenancy import Shares
from llmos.syscalls import abi
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import Syscall, check_args, lookup

log = logging.getLogger("llmos.kernel")


@dataclass
class KernelConfig:
    state_dir: Path
    socket: str
    listen: str | None = None              # a CURVE TCP endpoint for other machines (``kernel/curve.py``)
    model: str | None = "default"          # a path or hub id, "default" (built-in), or None
    device: str = "auto"
    attention_backend: str = "auto"        # "torch" (reference), "triton", or auto: triton on CUDA
    dtype: str | None = None
    kv_blocks: int | None = None           # device KV blocks; default: kv_fraction of free memory
    kv_fraction: float = 0.5
    host_kv_blocks: int | None = None      # swap space; default: as many as the device pool
    block_size: int = 16
    adapter_slots: int = 4                 # LoRA adapters on the device at once, per model
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    preempt_mode: str = "auto"
    max_frame: int = abi.MAX_FRAME_BYTES
    rate_limit: float = 0.0                # calls/s per user, 0 = unlimited
    max_procs_per_user: int = 1024
    kv_quota_blocks: int | None = None     # per non-root user, across all its processes
    fair_share: bool = True                # weighted fair queueing between users (--no-fair-share)
    max_drain: int = 256                   # syscalls handled per loop turn, so steps keep going
    device_budget: int | None = None       # bytes for weights + KV + adapters; default 90% of free
    host_budget: int | None = None         # bytes of offloaded weights; default 50% of available RAM
    reserve_fraction: float = 0.05         # of the device budget, never allocated
    aliases: dict = field(default_factory=dict)   # model alias -> path or hub id
    services: list = field(default_factory=list)  # services started at boot
    service_call_timeout: float = 60.0     # seconds a service may take to answer (or between frames)
    alerts: dict = field(default_factory=dict)    # alert name -> threshold (``--alert``)
    delegates: list = field(default_factory=list) # plug-ins allowed svc_call (built-ins always are)
    journal: bool = True                   # the process journal (``--no-journal``: processes die with it)
    journal_interval: float = 0.05         # seconds between group commits (0: every loop turn)
    session_timeout: float = 15.0          # seconds without a heartbeat before a session's HUP
    zombie_ttl: float = 3600.0             # seconds a zombie nobody waits for is kept
    trusted_keys: list = field(default_factory=list)  # CURVE keys that check users' keys themselves (a front)


@dataclass
class Call:
    """One authenticated, checked request on its way through a handler."""
    identity: bytes
    rid: Any
    user: User
    sc: Syscall
    args: dict
    session: str | None = None             # the caller's session (``kernel.sessions``)


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    requests: int = 0
    errors: int = 0
    rejects: Counter = field(default_factory=Counter)
    frames_dropped: int = 0
    disconnects: int = 0
    steps: int = 0
    tokens_generated: int = 0


class Kernel:
    def __init__(self, cfg: KernelConfig, users: UserDB):
        self.cfg = cfg
        self.users = users
        self.boot_id = secrets.token_hex(8)
        self.stats = Stats()
        self.metrics = Metrics()               # per-call counts, latency histograms (``stat``)
        self.rate = RateLimiter(cfg.rate_limit)
        self.running = True
        self.outbox = Outbox(self.stats)       # every frame the kernel sends
        self.table = ProcTable()               # one record per process
        self.shares = Shares(enabled=cfg.fair_share, default_kv_quota=cfg.kv_quota_blocks,
                             weights={u.uid: u.share for u in users.users.values()})
        self.device, models, default = (engines.boot(cfg, self.table.procs, self.shares)
                                        if cfg.model is not None else (None, None, None))
        self.procs = ProcManager(cfg, self.table, models, default, self.outbox, self.metrics, self.stats)
        if models is not None:
            models.park = self.procs.park
        self.journal = Journal(cfg.state_dir / "journal" if cfg.journal else None, cfg.journal_interval)
        self.sessions = Sessions(cfg.session_timeout, cfg.zombie_ttl)
        self.lost, self.journal_damage = self._restore()
        self.sessions.adopt(self.table.procs.values())
        self.stop_mode = "checkpoint"          # at shutdown: checkpoint | drain (first) | discard
        self.services = ServiceManager(cfg, self.outbox, models, on_memory_back=self.procs.retry_faulted)
        self.alerts = Alerts(self.outbox, self.table, self.procs.engines, self.metrics, self.services, cfg.alerts)
        self.queues: dict[Any, deque] = {}     # caller -> authenticated requests not yet served
        self.io = IOThread(cfg.socket, cfg.max_frame, curve=cfg.listen, state=cfg.state_dir)
        self.chan = self.io.channel
        self.poller = zmq.Poller()
        for sock in self.io.sockets:
            self.poller.register(sock, zmq.POLLIN)
        self.busy = False                      # the last turn ran a step

    def _restore(self) -> tuple[list[dict], str | None]:
        """The processes of the journal back in the table (those that cannot come back: lost)."""
        saved, next_pid, damage = self.journal.replay()
        self.table.next_pid = max([self.table.next_pid, next_pid] + [s.pid + 1 for s in saved])
        lost = restore.restore(self.procs, saved) if saved else []
        self.num_restored = len(saved) - len(lost)
        if saved:
            log.info("restored %d processes from the journal (%d lost)", len(saved) - len(lost), len(lost))
        self.journal.open(self.table.all(), self.table.next_pid)
        return lost, damage

    def commit(self, force: bool = False) -> None:
        """Group-commit the journal when due (or ``force``: replies are held for it); held
        replies go out once it is on disk."""
        if force or self.journal.due(time.monotonic()):
            self.journal.commit(self.table.procs.values(), self.table.next_pid)
            self.outbox.release()

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        self.io.start()
        log.info("kernel up: boot %s on %s", self.boot_id, self.cfg.socket)
        for name in self.cfg.services:
            self.services.start(name)
        try:
            while self.running:
                self.drain_syscalls(idle=not self.busy)
                self.commit(force=bool(self.outbox.held))    # acknowledged changes are on disk first
                self.outbox.flush(self.chan)
                self.procs.admit_loaded()                    # page faults served by the loader
                self.busy = False
                for engine in self.procs.engines():          # one step per model with work
                    if engine.sched.has_work():
                        plan = engine.sched.schedule()
                        if not plan.is_empty:
                            self.step(engine, plan)
                            self.busy = True
                self.commit()
                self.outbox.flush(self.chan)
                if self.stop_mode == "drain" and not self.procs.num_to_drain():
                    self.running = False
        finally:
            self.commit(force=True)                          # a clean stop checkpoints every process
            if self.stop_mode == "discard":
                self.journal.discard()
            self.journal.close()
            self.services.stop_all()
            self.procs.shutdown()
            self.alerts.shutdown()
            self.outbox.flush(self.chan)
            self.io.stop()
            log.info("kernel down")

    def step(self, engine, plan) -> None:
        """One forward pass. If anything in it fails (e.g. out of device memory), the processes
        it carried end with an error; the kernel and every other process go on."""
        try:
            self.procs.notify_preempted(plan)
            result = engine.driver.execute(plan)
            events = self.procs.update(engine, plan, result)
            self.procs.deliver(engine, events)
        except Exception as exc:
            self.procs.fail_plan(engine, plan, exc)

    def drain_syscalls(self, idle: bool) -> None:
        """Take what the I/O thread has queued (when idle, sleep until something arrives), then
        serve up to ``max_drain`` requests, one per caller in turn."""
        timeout = 0 if self.queues else (self.procs.idle_timeout_ms() if idle else 0)
        ready = dict(self.poller.poll(timeout))
        self.watch_connections(ready)
        backlog = sum(len(q) for q in self.queues.values())
        while backlog < 4 * self.cfg.max_drain:
            try:
                identity, *frames = self.chan.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            backlog += self.accept(identity, frames)
        if self.services.upstream is not None:
            self.services.upstream.drain()
        self.serve_queued(self.cfg.max_drain)
        self.procs.expire_waiters()
        self.sessions.tick(self.procs)
        self.services.tick()
        self.alerts.tick()

    def watch_connections(self, ready: dict) -> None:
        """Count disconnects; a refused CURVE handshake goes to the audit trail."""
        for mon in (self.io.monitor, self.io.curve and self.io.curve.monitor):
            while mon is not None and mon in ready and mon.poll(0):
                event = zmq.utils.monitor.parse_monitor_message(mon.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self.stats.disconnects += 1
                else:
                    audit.event("handshake_failed", endpoint=event["endpoint"].decode(errors="replace"),
                                reason=zmq.Event(event["event"]).name)

    def serve_queued(self, limit: int) -> int:
        """Serve up to about ``limit`` accepted requests, one per caller in turn (each caller's
        own in order); returns how many."""
        served = 0
        while self.queues and served < limit:
            for caller in list(self.queues):
                queue = self.queues[caller]
                self.serve(*queue.popleft())
                served += 1
                if not queue:
                    del self.queues[caller]
        return served

    # -- one request --------------------------------------------------------------------------
    def accept(self, identity: bytes, frames: list[bytes]) -> int:
        """Decode and authenticate one frame and queue it under its caller (1), or answer its
        error at once (0)."""
        self.stats.requests += 1
        if len(frames) != 1:
            self.stats.frames_dropped += 1      # not a DEALER single-frame request: no id to answer
            return 0
        try:
            req = abi.decode_request(frames[0], max_frame=self.cfg.max_frame)
        except SyscallError as err:
            if err.rid is None:
                self.stats.frames_dropped += 1
            else:
                self.outbox.error(identity, err.rid, err)
            return 0
        try:
            svc = self.services.authenticate(req.token)
            user = svc.user if svc is not None else self.users.authenticate(req.token)
        except SyscallError as err:
            audit.event("auth_failed", call=str(req.call)[:64], key=curve.key_of(identity), reason=err.message)
            self.outbox.error(identity, req.rid, err)
            return 0
        key = curve.key_of(identity)                # None on the local socket
        try:
            if key not in self.cfg.trusted_keys:
                self.users.check_key(user, key)
        except SyscallError as err:
            audit.event("key_refused", user=user.name, key=key)
            self.outbox.error(identity, req.rid, err)
            return 0
        self.sessions.touch(user.uid, req.session)
        caller = user.name if svc is not None else user.uid
        queue = self.queues.get(caller)
        if queue is None:
            queue = self.queues[caller] = deque()
        queue.append((identity, req, user, svc))
        return 1

    def serve(self, identity: bytes, req: abi.Request, user: User, svc) -> None:
        name = "unknown"
        try:
            sc = self.services.lookup(req.call) or lookup(req.call)
            name = sc.name
            self.metrics.calls[name] += 1
            self.users.check_cap(user, sc.cap, sc.name)
            if svc is None and not self.rate.allow(user.uid):
                raise SyscallError("EAGAIN", f"rate limit: {self.cfg.rate_limit:g} calls/s per user")
            call = Call(identity, req.rid, user, sc, check_args(sc, req.args), req.session)
            result = handlers.dispatch(self, call)
            if result is not PENDING_REPLY:
                self.outbox.reply(call, result, held=sc.journaled and self.journal.enabled)
        except SyscallError as err:
            self.metrics.call_errors[name] += 1
            self.outbox.error(identity, req.rid, err)
        except Exception as exc:               # a bug in a handler must not kill the kernel
            self.metrics.call_errors[name] += 1
            log.error("handler crashed on %r: %s", req.call, traceback.format_exc())
            self.outbox.error(identity, req.rid, SyscallError("EIO", f"{type(exc).__name__}: {exc}"))
