"""Kernel-wide counters and latency histograms, reported by ``stat`` (and from there by the
gateway's Prometheus ``/metrics``).

Counters of processes (tokens in, preemptions, swaps, prefix-cache hits) are the sum over live
processes plus what reaped ones left behind, so no scheduler code needs to know about them.
Time to first token (from spawn or write to the turn's first token) and inter-token latency
are histograms per priority (nice value), with Prometheus-style cumulative buckets.
"""
from __future__ import annotations

import bisect
from collections import Counter

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PROC_COUNTERS = ("tokens_in", "tokens_out", "num_preemptions", "num_swaps", "num_recomputes",
                 "num_cached_tokens")


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)      # per bucket (made cumulative when reported)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.bounds):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def row(self) -> dict:
        cumulative, total = [], 0
        for c in self.counts:
            total += c
            cumulative.append(total)
        return {"buckets": list(self.bounds), "counts": cumulative, "sum": round(self.sum, 6),
                "count": self.count}


class Metrics:
    def __init__(self):
        self.calls: Counter = Counter()
        self.call_errors: Counter = Counter()
        self.retired: Counter = Counter()          # PROC_COUNTERS of reaped processes
        self.ttft: dict[int, Histogram] = {}
        self.itl: dict[int, Histogram] = {}

    def first_token(self, nice: int, seconds: float) -> None:
        self.ttft.setdefault(nice, Histogram(TTFT_BUCKETS)).observe(seconds)

    def next_token(self, nice: int, seconds: float) -> None:
        self.itl.setdefault(nice, Histogram(ITL_BUCKETS)).observe(seconds)

    def retire(self, proc) -> None:
        for name in PROC_COUNTERS:
            self.retired[name] += getattr(proc, name)

    def totals(self, live_procs) -> Counter:
        """PROC_COUNTERS summed over live processes and those already reaped."""
        totals = Counter(self.retired)
        for p in live_procs:
            for name in PROC_COUNTERS:
                totals[name] += getattr(p, name)
        return totals

    def report(self, live_procs) -> dict:
        totals = self.totals(live_procs)
        return {"tokens_in": totals["tokens_in"], "tokens_out": totals["tokens_out"],
                "preemptions": totals["num_preemptions"], "swaps": totals["num_swaps"],
                "recomputes": totals["num_recomputes"], "prefix_hit_tokens": totals["num_cached_tokens"],
                "calls": dict(self.calls), "call_errors": dict(self.call_errors),
                "latency": {"ttft": {str(n): h.row() for n, h in sorted(self.ttft.items())},
                            "itl": {str(n): h.row() for n, h in sorted(self.itl.items())}}}
