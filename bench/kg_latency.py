"""Knowledge-graph latency: queries and neighbourhoods at 1M edges, and start-up after a crash.

    python bench/kg_latency.py [--edges 1000000] [--abi-edges 100000] [--wal-records N]
                               [--samples 1000] [--repeat 3] [--parts latency,abi,crash]

The graph: ``--edges`` random facts ``(E<i>, rel_<j>, E<k>)`` over edges/5 entities, subjects
and objects drawn with a power-law-ish skew (entity ``int(N * u**2.5)``: a few hubs with
thousands of facts, a long tail with one or two), 8 relation types, also skewed; a fixed seed.

latency  ``GraphStore`` in this process: the build (batched ``add`` of ``--batch`` triples per
         call, each batch one fsynced log record, default compaction), then ``--samples``
         calls of each kind, the kinds interleaved:
           query    ("?x", "rel_1", E)                                   (limit 100)
           join     [("?x", "rel_1", E), ("?x", "rel_2", "?y")]          (limit 100)
           nbr d=1  neighbors(F, depth=1)      nbr d=2  neighbors(F, depth=2)
         E: the object of a random rel_1 fact (the query finds something); F: an entity drawn
         uniformly from the graph.
         p50/p99 of each, and the median result size (rows, or nodes/edges).
abi      The same calls through the ABI (a kernel with the kg service; graph built with
         ``kg_add``) on a ``--abi-edges`` graph, next to the library on the same graph in this
         process: the difference is what the kernel, the service hop and msgpack cost.
crash    Start-up after a crash with ``--wal-records`` logged writes: a child process adds the
         facts one per ``add`` call (one log record each) with compaction off, then is
         SIGKILLed (no close). The log's bytes are those the real write path produces; only
         its ``fdatasync`` is skipped while building, or a million of them would take an hour.
         Timed, in a fresh process each time: ``GraphStore(root)`` + the first query (which
         opens the graph: log replay). Then the graph is compacted, and the same is timed
         again (snapshot load, empty log). Medians of ``--repeat`` fresh processes; the files
         are in the page cache both times.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as bc

NUM_RELATIONS = 8


def make_triples(n: int, seed: int) -> tuple[list[tuple[str, str, str]], int]:
    """``n`` skewed random triples (a few may repeat) and the number of entities drawn from."""
    rng = random.Random(seed)
    num_ent = max(100, n // 5)
    r = rng.random
    out = []
    for _ in range(n):
        s = int(num_ent * r() ** 2.5)
        o = int(num_ent * r() ** 2.5)
        if o == s:
            o = (s + 1) % num_ent
        out.append((f"E{s}", f"rel_{int(NUM_RELATIONS * r() ** 1.5)}", f"E{o}"))
    return out, num_ent


def entities_of(triples) -> list[str]:
    return sorted({t[0] for t in triples} | {t[2] for t in triples}, key=lambda e: int(e[1:]))


def build_store(root: Path, triples, batch: int):
    from llmos.services.kg import GraphStore
    store = GraphStore(root)
    t0 = time.perf_counter()
    for i in range(0, len(triples), batch):
        store.add(0, triples[i:i + batch], source="bench")
    return store, time.perf_counter() - t0


def workload(triples, entities: list[str], samples: int, seed: int) -> list[tuple[str, str]]:
    """(kind, entity) pairs, the kinds interleaved. Queries ask about the object of a random
    ``rel_1`` fact (so they find something); neighbourhoods start at a uniform random entity."""
    rng = random.Random(seed)
    targets = [t[2] for t in triples if t[1] == "rel_1"]
    work = []
    for _ in range(samples):
        e = rng.choice(targets)
        work += [("query", e), ("join", e), ("nbr d=1", rng.choice(entities)),
                 ("nbr d=2", rng.choice(entities))]
    return work


def lib_call(store, kind: str, e: str):
    if kind == "query":
        return store.query(0, ("?x", "rel_1", e), "mine", 100)
    if kind == "join":
        return store.query(0, [("?x", "rel_1", e), ("?x", "rel_2", "?y")], "mine", 100)
    return store.neighbors(0, e, depth=1 if kind == "nbr d=1" else 2)


def abi_call(c, kind: str, e: str):
    if kind == "query":
        return c.call("kg_query", pattern=["?x", "rel_1", e], limit=100)
    if kind == "join":
        return c.call("kg_query", pattern=[["?x", "rel_1", e], ["?x", "rel_2", "?y"]], limit=100)
    return c.call("kg_neighbors", entity=e, depth=1 if kind == "nbr d=1" else 2)


def size_of(result) -> str:
    if isinstance(result, dict):
        return f"{len(result['nodes'])}/{len(result['edges'])}"
    return str(len(result))


def measure(fn, work) -> dict[str, dict]:
    """Per kind: latencies in ms, and result sizes."""
    out: dict[str, dict] = {}
    for kind, e in work:
        t0 = time.perf_counter()
        res = fn(kind, e)
        ms = (time.perf_counter() - t0) * 1e3
        d = out.setdefault(kind, {"ms": [], "n": [], "n2": []})
        d["ms"].append(ms)
        if isinstance(res, dict):
            d["n"].append(len(res["nodes"]))
            d["n2"].append(len(res["edges"]))
        else:
            d["n"].append(len(res))
    return out


def print_latency(label: str, stats: dict[str, dict], ref: dict[str, dict] | None = None) -> None:
    for kind, d in stats.items():
        p50, p99 = bc.percentile(d["ms"], 50), bc.percentile(d["ms"], 99)
        size = (f"{bc.med(d['n']):.0f} nodes / {bc.med(d['n2']):.0f} edges (max {max(d['n2'])} edges)"
                if d["n2"] else f"{bc.med(d['n']):.0f} rows (max {max(d['n'])})")
        extra = ""
        if ref is not None:
            r = ref[kind]["ms"]
            extra = (f"   ABI/lib p50 {p50 / bc.percentile(r, 50):5.1f}x, "
                     f"+{p50 - bc.percentile(r, 50):.3f} ms")
        print(f"    {label:<6} {kind:<8} p50 {p50:8.3f} ms   p99 {p99:8.3f} ms   "
              f"median result {size}{extra}")


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


# -- crash: child programs ------------------------------------------------------------------

_WRITER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[3])
os.fdatasync = lambda fd: None          # building only: the bytes written are the real ones
from kg_latency import make_triples
from llmos.services.kg import GraphStore
triples, _ = make_triples(int(sys.argv[2]), int(sys.argv[4]))
store = GraphStore(sys.argv[1], compact_ops=1 << 62, compact_bytes=1 << 62)
t0 = time.perf_counter()
for t in triples:
    store.add(0, [t], source="bench")
print(json.dumps({"s": time.perf_counter() - t0, "stats": store.stats(0)}), flush=True)
time.sleep(3600)                        # killed here, never closed
"""

_OPENER = r"""
import json, resource, sys, time
from llmos.services.kg import GraphStore
t0 = time.perf_counter()
store = GraphStore(sys.argv[1])
res = store.query(0, ("?x", "rel_1", sys.argv[2]), "mine", 100)
s = time.perf_counter() - t0
st = store.stats(0)
if len(sys.argv) > 3:                   # compact after timing
    store.compact(0)
store.close()
print(json.dumps({"s": s, "rows": len(res), "stats": st,
                  "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)}))
"""


def _open_once(root: Path, probe: str, compact: bool = False) -> dict:
    args = [sys.executable, "-c", _OPENER, str(root), probe] + (["compact"] if compact else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def crash_part(work: Path, records: int, repeat: int, seed: int, probe: str) -> None:
    root = work / "crash"
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(records),
                              str(Path(__file__).resolve().parent), str(seed)],
                             stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    child.send_signal(signal.SIGKILL)                    # the crash: no close, no compaction
    child.wait()
    if not line:
        raise RuntimeError("the writer died before logging everything")
    built = json.loads(line)
    wal = root / "user-0" / "wal.jsonl"
    wal_mb = wal.stat().st_size / 1e6
    print(f"  crash: {built['stats']['wal_ops']} log records written in {built['s']:.1f} s "
          f"(one add per record; total {time.perf_counter() - t0:.1f} s with generation), "
          f"log {wal_mb:.0f} MB; writer SIGKILLed")

    replay = [_open_once(root, probe) for _ in range(repeat)]
    _open_once(root, probe, compact=True)                # fold the log into a snapshot
    snap_mb = (root / "user-0" / "snapshot.json").stat().st_size / 1e6
    snap = [_open_once(root, probe) for _ in range(repeat)]
    assert all(r["rows"] == replay[0]["rows"] for r in replay + snap)
    r_s, s_s = bc.med([r["s"] for r in replay]), bc.med([r["s"] for r in snap])
    r_runs, s_runs = (", ".join(f"{r['s']:.2f}" for r in xs) for xs in (replay, snap))
    print(f"    after crash (replay {replay[0]['stats']['replayed_at_open']} log records)   "
          f"{r_s:7.2f} s   runs: {r_runs}   "
          f"peak RSS {max(r['rss_gib'] for r in replay):.2f} GiB")
    print(f"    after compaction (snapshot {snap_mb:.0f} MB, log empty: replayed "
          f"{snap[0]['stats']['replayed_at_open']})  {s_s:7.2f} s   runs: "
          f"{s_runs}   peak RSS {max(r['rss_gib'] for r in snap):.2f} GiB")
    print(f"    ratio replay / snapshot load  {r_s / s_s:.2f}x   "
          f"({snap[0]['stats']['num_triples']} triples, {snap[0]['stats']['num_entities']} entities; "
          f"GraphStore(root) + first query, fresh process each)")
    shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edges", type=int, default=1_000_000, help="graph size for in-process latency")
    ap.add_argument("--abi-edges", type=int, default=100_000, help="graph size for the ABI comparison")
    ap.add_argument("--wal-records", type=int, default=None, help="logged writes for the crash part (default: --edges)")
    ap.add_argument("--batch", type=int, default=10_000, help="triples per add when building")
    ap.add_argument("--samples", type=int, default=1000, help="calls of each kind")
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per start-up timing")
    ap.add_argument("--parts", default="latency,abi,crash")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    records = a.wal_records or a.edges
    work = Path(tempfile.mkdtemp(prefix="llmos-kgbench-"))
    print(f"kg latency: power-law-ish random graph, {NUM_RELATIONS} relations, entities = edges/5; "
          f"{os.cpu_count()} cores; {a.samples} calls of each kind; p50/p99 in ms")
    try:
        if "latency" in parts:
            t0 = time.perf_counter()
            triples, _ = make_triples(a.edges, a.seed)
            ents = entities_of(triples)
            gen = time.perf_counter() - t0
            store, build = build_store(work / "lib", triples, a.batch)
            st = store.stats(0)
            work_items = workload(triples, ents, a.samples, a.seed + 1)
            del triples
            print(f"  GraphStore in-process, {st['num_triples']} edges / {st['num_entities']} entities "
                  f"(asked {a.edges}; generated in {gen:.1f} s)")
            print(f"    build: {build:.1f} s = {st['num_triples'] / build:,.0f} edges/s "
                  f"(add of {a.batch} per call, fsynced, default compaction)")
            print_latency("lib", measure(lambda k, e: lib_call(store, k, e), work_items))
            print(f"    peak RSS of this process so far {rss_gib():.2f} GiB")
            store.close()
            del store, ents
            gc.collect()

        if "abi" in parts:
            triples, _ = make_triples(a.abi_edges, a.seed)
            ents = entities_of(triples)
            work_items = workload(triples, ents, a.samples, a.seed + 1)
            store, build = build_store(work / "lib-small", triples, a.batch)
            n_edges = store.stats(0)["num_triples"]
            k = bc.start_service_kernel("kg")
            try:
                with k.client(timeout=300) as c:
                    t0 = time.perf_counter()
                    for i in range(0, len(triples), a.batch):
                        c.call("kg_add", triples=[list(t) for t in triples[i:i + a.batch]], source="bench")
                    abi_build = time.perf_counter() - t0
                    abi_call(c, "query", ents[0])                              # warm-up
                    abi = measure(lambda kd, e: abi_call(c, kd, e), work_items)
            finally:
                k.cleanup()
            lib = measure(lambda kd, e: lib_call(store, kd, e), work_items)
            print(f"  through the ABI (kernel + kg service) vs in-process, {n_edges} edges / {len(ents)} entities")
            print(f"    build: ABI kg_add {abi_build:.1f} s = {n_edges / abi_build:,.0f} edges/s; "
                  f"in-process {build:.1f} s = {n_edges / build:,.0f} edges/s")
            print_latency("lib", lib)
            print_latency("ABI", abi, ref=lib)
            store.close()
            del store
            gc.collect()

        if "crash" in parts:
            crash_part(work, records, a.repeat, a.seed, probe="E1")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.edges < 1_000_000 or records < 1_000_000:
        print(f"  NOTE: run at {a.edges} edges / {records} log records, below the 1M target "
              f"(the full size: --edges 1000000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
