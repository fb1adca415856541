"""Alerts: thresholds on the kernel's health that raise events programs can subscribe to.

Every ``CHECK_EVERY_S`` the kernel measures each rule's value; a rule whose value reaches its
threshold *fires* (an event), and *resolves* (another event) when it drops below. ``alerts``
answers the firing alerts and the events after ``since``; with ``wait`` it long-polls: the
reply waits until a new event or the deadline, so ``while True: alerts(since=seq, wait=30)``
is a subscription. Thresholds come from ``--alert NAME=VALUE`` at boot or ``alert_set``
(admin); a threshold of 0 turns a rule off.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from llmos.kernel.proc import ProcState
from llmos.syscalls.errors import SyscallError

CHECK_EVERY_S = 0.5
SWAP_WINDOW_S = 10.0
MAX_EVENTS = 1000
# name -> (what the value is, default threshold, severity)
RULES = {
    "kv_usage": ("fraction of a model's KV blocks in use", 0.95, "warning"),
    "queue_wait_s": ("longest wait of a runnable process for its first token, seconds", 30.0, "warning"),
    "swap_rate": (f"KV swaps per second over the last {SWAP_WINDOW_S:g} s", 5.0, "warning"),
    "service_down": ("services down (waiting for a restart)", 1.0, "critical"),
}


@dataclass
class Waiter:
    call: object
    since: int
    deadline: float


class Alerts:
    """Given what it measures (the process table, the engines, the metrics, the services) and
    the outbox its answers go to."""

    def __init__(self, outbox, table, engines, metrics, services, thresholds: dict[str, float] | None = None):
        self.outbox, self.table, self.engines = outbox, table, engines
        self.metrics, self.services = metrics, services
        self.thresholds = {name: default for name, (_, default, _) in RULES.items()}
        for name, value in (thresholds or {}).items():
            self.set(name, value)
        self.firing: dict[str, dict] = {}
        self.events: deque[dict] = deque(maxlen=MAX_EVENTS)
        self.seq = 0
        self.waiters: list[Waiter] = []
        self.swaps: deque[tuple[float, int]] = deque()
        self.next_check = 0.0

    def set(self, name: str, threshold: float) -> None:
        if name not in RULES:
            raise SyscallError("EINVAL", f"no alert {name!r}; known: {sorted(RULES)}")
        if not threshold >= 0:
            raise SyscallError("EINVAL", f"threshold must be >= 0 (0 turns {name} off)")
        self.thresholds[name] = float(threshold)

    # -- measuring ----------------------------------------------------------------------------
    def values(self) -> dict[str, float]:
        now, procs = time.monotonic(), self.table.all()
        kv = [e.sched.block_manager for e in self.engines()]
        waits = [now - p.io.turn_started_at for p in procs
                 if p.state in (ProcState.READY, ProcState.SWAPPED, ProcState.BLOCKED)
                 and p.io.last_token_at is None and not p.io.turn_done]
        swaps = self.metrics.totals(procs)["num_swaps"]
        self.swaps.append((now, swaps))
        while self.swaps[0][0] < now - SWAP_WINDOW_S:
            self.swaps.popleft()
        span = now - self.swaps[0][0]
        return {"kv_usage": max((1 - bm.num_free_blocks / bm.num_blocks for bm in kv), default=0.0),
                "queue_wait_s": max(waits, default=0.0),
                "swap_rate": (swaps - self.swaps[0][1]) / span if span >= 1.0 else 0.0,
                "service_down": float(self.services.num_down())}

    def tick(self) -> None:
        now = time.monotonic()
        if self.waiters:
            for w in [w for w in self.waiters if w.deadline <= now]:
                self.waiters.remove(w)
                self.outbox.reply(w.call, self.report(w.since))
        if now < self.next_check:
            return
        self.next_check = now + CHECK_EVERY_S
        for name, value in self.values().items():
            limit = self.thresholds[name]
            on = limit > 0 and value >= limit
            if on and name not in self.firing:
                self.firing[name] = {"name": name, "severity": RULES[name][2], "value": round(value, 3),
                                     "threshold": limit, "since": round(time.time(), 3),
                                     "message": f"{RULES[name][0]}: {value:.3g} >= {limit:g}"}
                self._event({**self.firing[name], "state": "firing"})
            elif on:
                self.firing[name]["value"] = round(value, 3)
            elif name in self.firing:
                del self.firing[name]
                self._event({"name": name, "state": "resolved", "value": round(value, 3), "threshold": limit,
                             "severity": RULES[name][2], "message": f"{RULES[name][0]}: back to {value:.3g}"})

    def _event(self, event: dict) -> None:
        self.seq += 1
        self.events.append({"seq": self.seq, "t": round(time.time(), 3), **event})
        for w in self.waiters:
            self.outbox.reply(w.call, self.report(w.since))
        self.waiters.clear()

    # -- answering ----------------------------------------------------------------------------
    def report(self, since: int | None) -> dict:
        events = [e for e in self.events if since is not None and e["seq"] > since]
        return {"active": list(self.firing.values()), "events": events, "seq": self.seq,
                "thresholds": dict(self.thresholds)}

    def wait(self, call, since: int, seconds: float) -> None:
        self.waiters.append(Waiter(call, since, time.monotonic() + seconds))

    def shutdown(self) -> None:
        for w in self.waiters:
            self.outbox.fail(w.call, SyscallError("ECANCELED", "kernel shutting down"))
        self.waiters.clear()
