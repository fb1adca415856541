"""The gateway's Prometheus metrics: what the gateway measures itself, the kernel's own figures
read through the ABI on every scrape, and who may scrape them (``ScrapeGuard``).

Both live in one private ``CollectorRegistry`` per gateway, so two gateways in one process (tests)
never share counters. Kernel figures the kernel does not report yet are simply absent.
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator

from llmos.syscalls.errors import SyscallError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from llmos.userland.gateway_request import ApiError, bearer_token

PROC_STATES = ("READY", "RUNNING", "BLOCKED", "STOPPED", "SWAPPED", "ZOMBIE")    # always exported, 0 or not
SCRAPE_CAPS = frozenset({"admin", "metrics"})     # either one lets a user read /metrics
SCRAPE_TTL_S = 5.0                               # how long a token's capabilities are trusted
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    """Counters the request handlers update; ``registry`` also carries the kernel collector."""

    def __init__(self, kernel_calls: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("llmos_gateway_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("llmos_gateway_requests_in_flight", "requests in their handlers (a stream: until "
                               "its response starts)", registry=r)
        self.streams = Gauge("llmos_gateway_streams", "event streams being sent now", registry=r)
        self.request_seconds = Histogram("llmos_gateway_request_seconds", "request duration (to the last byte)",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmos_gateway_ttft_seconds", "time from request to the first token, by nice",
                              ["priority"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmos_gateway_itl_seconds", "time between output tokens, by nice",
                             ["priority"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_in = Counter("llmos_gateway_tokens_in", "prompt tokens of served requests", ["model"], registry=r)
        self.tokens_out = Counter("llmos_gateway_tokens_out", "tokens generated for served requests",
                                  ["model"], registry=r)
        if kernel_calls is not None:
            r.register(KernelCollector(kernel_calls))


class ScrapeGuard:
    """Who may read ``/metrics``: the caller's own bearer token (never the gateway's default
    one), whose user holds ``admin`` or ``metrics``. ``whoami(token)`` asks the kernel (a
    blocking ABI call); its capabilities are remembered per token hash for ``ttl`` seconds, so a
    scraper costs the kernel one call every few seconds, and a revoked token is refused soon."""

    def __init__(self, whoami: Callable[[str], dict], ttl: float = SCRAPE_TTL_S):
        self.whoami, self.ttl = whoami, ttl
        self._caps: dict[str, tuple[float, frozenset]] = {}    # sha256(token) -> (when asked, caps)
        self._lock = threading.Lock()

    @staticmethod
    def token_of(authorization: str | None) -> str:
        """The request's bearer token; 401 (the gateway's usual error) when there is none."""
        return bearer_token(authorization, None)

    def cached(self, token: str) -> frozenset | None:
        """The token's capabilities if asked less than ``ttl`` seconds ago, else None (no I/O)."""
        with self._lock:
            at, caps = self._caps.get(_digest(token), (0.0, None))
        return caps if time.monotonic() - at <= self.ttl else None

    def ask(self, token: str) -> frozenset:
        """The token's capabilities from the kernel (EACCES for an unknown token), remembered."""
        caps = frozenset(self.whoami(token).get("caps") or ())
        now = time.monotonic()
        with self._lock:
            self._caps = {d: v for d, v in self._caps.items() if now - v[0] <= self.ttl}
            self._caps[_digest(token)] = (now, caps)
        return caps

    @staticmethod
    def allow(caps: frozenset) -> None:
        """403 unless ``caps`` hold admin or metrics."""
        if not caps & SCRAPE_CAPS:
            raise ApiError(403, "reading /metrics needs the admin or metrics capability",
                           "permission_error", code="EPERM")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class KernelCollector(Collector):
    """Turns ``stat``, ``meminfo``, ``models`` and ``free`` replies into metric families.

    ``kernel_calls()`` returns {call name: reply} for the calls that answered (a call the
    scrape token may not make is just missing); it raises SyscallError if the kernel is down."""

    def __init__(self, kernel_calls: Callable[[], dict]):
        self.kernel_calls = kernel_calls

    def describe(self):
        return []      # families depend on what the kernel reports; never collect at register time

    def collect(self) -> Iterator:
        try:
            replies = self.kernel_calls()
        except SyscallError:
            replies = None
        yield GaugeMetricFamily("llmos_kernel_up", "1 if the kernel answered this scrape", value=int(bool(replies)))
        if not replies:
            return
        if "stat" in replies:
            yield from _stat_families(replies["stat"])
        if "meminfo" in replies:
            yield from _meminfo_families(replies["meminfo"])
        if "models" in replies:
            yield from _model_families(replies["models"])
        if "free" in replies:
            yield from _free_families(replies["free"])


def _counter(name: str, doc: str, value) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _stat_families(s: dict) -> Iterator:
    yield GaugeMetricFamily("llmos_kernel_uptime_seconds", "kernel uptime", value=s.get("uptime_s", 0))
    yield _counter("llmos_syscall_requests", "syscalls the kernel received", s.get("requests", 0))
    yield _counter("llmos_syscall_errors", "syscalls answered with an error", s.get("errors", 0))
    yield _counter("llmos_kernel_steps", "scheduler steps run", s.get("steps", 0))
    rejects = CounterMetricFamily("llmos_syscall_rejects", "refused syscalls by errno", labels=["errno"])
    for errno, n in sorted((s.get("rejects") or {}).items()):
        rejects.add_metric([str(errno)], n)
    yield rejects
    procs = GaugeMetricFamily("llmos_procs", "processes by state", labels=["state"])
    by_state = {state: 0 for state in PROC_STATES} | {str(k).upper(): v for k, v in (s.get("procs") or {}).items()}
    for state, n in sorted(by_state.items()):
        procs.add_metric([state], n)
    yield procs
    for key, name, doc in (("tokens_generated", "llmos_tokens_generated", "tokens generated by the kernel"),
                           ("tokens_in", "llmos_tokens_in", "prompt tokens taken in by the kernel"),
                           ("tokens_out", "llmos_tokens_out", "tokens put out by the kernel"),
                           ("swaps", "llmos_swaps", "KV swaps to host memory"),
                           ("preemptions", "llmos_preemptions", "processes preempted"),
                           ("prefix_hit_tokens", "llmos_prefix_hit_tokens", "prompt tokens served from the prefix cache")):
        if key in s:
            yield _counter(name, doc, s[key])
    for key, name, doc in (("calls", "llmos_calls", "syscalls by name"),
                           ("call_errors", "llmos_call_errors", "failed syscalls by name")):
        if isinstance(s.get(key), dict):
            fam = CounterMetricFamily(name, doc, labels=["call"])
            for call, n in sorted(s[key].items()):
                fam.add_metric([str(call)], n)
            yield fam
    latency = s.get("latency") or {}
    for key, name, doc in (("ttft", "llmos_ttft_seconds", "kernel time to first token, by nice"),
                           ("itl", "llmos_itl_seconds", "kernel inter-token latency, by nice")):
        if isinstance(latency.get(key), dict):
            yield _histogram(name, doc, latency[key])


def _histogram(name: str, doc: str, by_nice: dict) -> HistogramMetricFamily:
    """The kernel's {nice: {buckets: [upper bounds], counts: [cumulative], sum, count}} as one family."""
    fam = HistogramMetricFamily(name, doc, labels=["priority"])
    for nice, h in sorted(by_nice.items(), key=lambda kv: str(kv[0])):
        bounds, counts = list(h.get("buckets") or []), list(h.get("counts") or [])
        buckets = [(_le(b), c) for b, c in zip(bounds, counts) if not math.isinf(float(b))]
        buckets.append(("+Inf", h.get("count", counts[-1] if counts else 0)))
        fam.add_metric([str(nice)], buckets, sum_value=h.get("sum", 0.0))
    return fam


def _le(bound) -> str:
    return repr(float(bound))


def _meminfo_families(m: dict) -> Iterator:
    blocks = GaugeMetricFamily("llmos_kv_blocks", "KV cache blocks by model and kind", labels=["model", "kind"])
    util = GaugeMetricFamily("llmos_kv_utilization", "fraction of KV blocks in use", labels=["model"])
    pools = m.get("pools") or {"": m}
    for model, pool in sorted(pools.items()):
        for kind in ("total", "used", "free", "shared", "cached", "swapped"):
            if f"blocks_{kind}" in pool:
                blocks.add_metric([model, kind], pool[f"blocks_{kind}"])
        util.add_metric([model], pool.get("utilization", 0.0))
    yield blocks
    yield util
    yield GaugeMetricFamily("llmos_kv_bytes_used", "bytes of KV cache in use", value=m.get("bytes_used", 0))


def _model_families(models: list) -> Iterator:
    where = GaugeMetricFamily("llmos_model_resident", "1 where a model's weights are (device, host, disk)",
                              labels=["model", "where"])
    weights = GaugeMetricFamily("llmos_model_weight_bytes", "bytes of a model's weights", labels=["model"])
    procs = GaugeMetricFamily("llmos_model_processes", "processes using a model", labels=["model"])
    for m in models:
        name = str(m.get("name"))
        for place in ("device", "host", "disk"):
            where.add_metric([name, place], int(m.get("where") == place))
        weights.add_metric([name], m.get("bytes") or 0)
        procs.add_metric([name], m.get("processes") or 0)
    yield where
    yield weights
    yield procs


def _free_families(f: dict) -> Iterator:
    fam = GaugeMetricFamily("llmos_memory_bytes", "device and host memory budgets by use", labels=["pool", "use"])
    for pool in ("device", "host"):
        for use, n in sorted((f.get(pool) or {}).items()):
            fam.add_metric([pool, use], n)
    yield fam
