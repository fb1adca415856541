"""A cluster on this machine: prefix-aware placement, the front's cost, and 2 kernels vs 1.

    python bench/cluster.py [--users 16] [--calls 2000]

(a) A shared-prefix workload, 8 system prompts x ``users`` questions in a seeded random order,
    8 clients at a time, on 3 kernels whose KV pools hold about a third of the system prompts each,
    under each placement policy (prefix-aware, round-robin, least-loaded): prefix-cache hit rate
    (cached prompt tokens / prompt tokens) and output tokens/s. Target: prefix >= 2x round-robin.
(b) The front's added latency on a null call (``nop``): through the front vs straight to the
    head kernel's own socket, same token, interleaved. Target: p50 <= 1.5x.
(c) Throughput of 2 kernels vs 1 (bench Llama, a load that saturates one kernel). A kernel
    steps on one core here, so 2 kernels on this 2-core machine gain what the second core gives,
    less what the front and the client take from both; with one GPU per kernel the kernels share
    nothing but the front.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_LLAMA, MODEL_DIR  # noqa: E402
from cluster_proc import ClusterProc  # noqa: E402  (from tests/, on the path via _common)

BASE = ("--device", "cpu", "--dtype", "float32", "--journal-interval", "0.05")
SYSTEM_LEN, QUESTION_LEN, BLOCK = 192, 16, 16
KERNELS = 3                  # for (a): with K kernels the best prefix-aware gain is about K x


def shared_prefix_run(policy: str, users: int, vocab: int) -> dict:
    rng = random.Random(7)
    systems = [[rng.randrange(10, vocab - 1) for _ in range(SYSTEM_LEN)] for _ in range(8)]
    work = [(s, [rng.randrange(10, vocab - 1) for _ in range(QUESTION_LEN)]) for s in range(8) for _ in range(users)]
    rng.shuffle(work)
    # 48 blocks a kernel: 3 system prompts (36 blocks) and 4 running questions (8) fit, all 8 (96)
    # do not: placed by prefix, each kernel holds its third of them; spread, each thrashes.
    cl = ClusterProc(*BASE, "--kv-blocks", "48", "--block-size", str(BLOCK), "--max-num-seqs", "4",
                     "--placement", policy, kernels=KERNELS).start()
    try:
        def one(job):
            s, q = job
            with cl.client() as c:
                return c.wait(c.spawn(prompt_ids=systems[s] + q, max_tokens=8, temperature=0.0, ignore_eos=True))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, work))
        wall = time.perf_counter() - t0
        with cl.client() as c:
            placed = c.cluster()["placement"]
    finally:
        cl.cleanup()
    prompt = sum(r["usage"]["prompt_tokens"] for r in results)
    cached = sum(r["usage"]["cached_tokens"] for r in results)
    out = sum(r["usage"]["completion_tokens"] for r in results)
    return {"policy": policy, "hit_rate": cached / prompt, "tok_s": out / wall, "placed": placed}


def latency_run(calls: int) -> tuple[float, float]:
    cl = ClusterProc(*BASE, "--model", "default", kernels=1).start()
    try:
        head = f"ipc://{cl.state / 'run' / 'head.sock'}"
        from llmos import connect
        via_front, direct = [], []
        with cl.client() as front, connect(head, cl.token) as kernel:
            for _ in range(50):
                front.nop(), kernel.nop()                  # warm both paths
            for block in range(calls // 100):
                for c, xs in ((front, via_front), (kernel, direct))[::1 if block % 2 else -1]:
                    for _ in range(100):
                        t = time.perf_counter()
                        c.nop()
                        xs.append(time.perf_counter() - t)
        return statistics.median(via_front), statistics.median(direct)
    finally:
        cl.cleanup()


def throughput_run(kernels: int, model: str, procs: int, vocab: int) -> float:
    rng = random.Random(3)
    prompts = [[rng.randrange(10, vocab - 1) for _ in range(64)] for _ in range(procs)]
    cl = ClusterProc(*BASE, "--model", model, "--max-num-seqs", "64", "--placement", "least-loaded",
                     kernels=kernels).start()
    try:
        with cl.client() as c:
            c.wait(c.spawn(prompt_ids=prompts[0][:8], max_tokens=2))             # warm up
            t0 = time.perf_counter()
            pids = [c.spawn(prompt_ids=p, max_tokens=64, temperature=0.0, ignore_eos=True) for p in prompts]
            out = sum(c.wait(p, _timeout=600)["usage"]["completion_tokens"] for p in pids)
            return out / (time.perf_counter() - t0)
    finally:
        cl.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=16, help="questions per system prompt")
    ap.add_argument("--calls", type=int, default=2000, help="null calls per path")
    ap.add_argument("--procs", type=int, default=48, help="processes of the throughput load")
    ap.add_argument("--only", default="abc", help="which parts to run (a, b, c)")
    a = ap.parse_args()
    from transformers import AutoConfig
    from llmos.drivers.default_model import ensure_default_model, make_tiny_model
    bench = make_tiny_model("llama", MODEL_DIR / "bench-llama-256x4", **BENCH_LLAMA)
    vocab = AutoConfig.from_pretrained(ensure_default_model(MODEL_DIR)).vocab_size    # the kernels' default

    if "a" in a.only:
        shared_prefix(a, vocab)
    if "b" in a.only:
        front, direct = latency_run(a.calls)
        print(f"(b) null call p50: via the front {front * 1e6:.0f} us, straight to the kernel {direct * 1e6:.0f} us: "
              f"{front / direct:.2f}x (target <= 1.5x)")
    if "c" in a.only:
        throughput(a, bench)
    return 0


def shared_prefix(a, vocab: int) -> None:
    print(f"(a) shared prefix: 8 system prompts x {a.users} users, {SYSTEM_LEN}+{QUESTION_LEN} tokens, "
          f"{KERNELS} kernels of 48 KV blocks")
    runs = {p: shared_prefix_run(p, a.users, vocab) for p in ("prefix", "round-robin", "least-loaded")}
    for p, r in runs.items():
        print(f"    {p:13s} hit rate {r['hit_rate']:6.1%}   {r['tok_s']:7.1f} tok/s   placed {r['placed']}")
    rr = runs["round-robin"]["hit_rate"]
    print(f"    prefix-aware hit rate = {runs['prefix']['hit_rate'] / max(rr, 1e-9):.2f}x round-robin's "
          f"(target >= 2x), {runs['prefix']['hit_rate'] / max(runs['least-loaded']['hit_rate'], 1e-9):.2f}x "
          f"least-loaded's; throughput {runs['prefix']['tok_s'] / runs['round-robin']['tok_s']:.2f}x round-robin's")


def throughput(a, bench: str) -> None:
    from transformers import AutoConfig
    bench_vocab = AutoConfig.from_pretrained(bench).vocab_size
    one = throughput_run(1, bench, a.procs, bench_vocab)
    two = throughput_run(2, bench, a.procs, bench_vocab)
    print(f"(c) {a.procs} processes x 64 tokens, bench Llama: 1 kernel {one:.0f} tok/s, 2 kernels {two:.0f} tok/s: "
          f"{two / one:.2f}x. Here the second kernel gets the second core, shared with the front and the client; "
          "with a GPU per kernel each kernel keeps its own device and the ratio approaches the number of "
          "kernels until the front (one Python process) saturates.")


if __name__ == "__main__":
    sys.exit(main())
