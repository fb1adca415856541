"""Time to first token of an urgent process under a saturating load, vs unloaded and vs FCFS.

    python bench/priority.py [--load 48] [--max-num-seqs 16] [--probes 9]
                             [--model PATH | --shape bench-llama|tiny|qwen3-0.6b] [--device auto]

One kernel; three measurements, each over ``--probes`` probe processes sent one after another
(``--probe-len`` prompt tokens, greedy). TTFT = from just before ``spawn`` to the first
streamed ``read`` frame carrying a token.

1. unloaded: the probe (nice -10) alone on the kernel;
2. priority: ``--load`` nice-10 processes with long outputs are started first and are all
   running (more of them than ``--max-num-seqs`` batch slots, so the kernel is saturated and
   has a queue); the probe arrives at nice -10;
3. fcfs: the same load, but the probe has the load's nice (10): it arrives last in a queue of
   equals, as under first-come-first-served.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import _common as bc


def probe(c, prompt: list[int], nice: int) -> float:
    t0 = time.perf_counter()
    pid = c.spawn(prompt_ids=prompt, max_tokens=1, temperature=0.0, ignore_eos=True, priority=nice)
    ttft = bc.first_token_latency(c, pid, t0)
    c.wait(pid)
    return ttft


def start_load(c, prompts: list[list[int]], max_tokens: int, nice: int, slots: int) -> list[int]:
    """Spawn the load and return once every batch slot is busy generating."""
    pids = [c.spawn(prompt_ids=p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                    priority=nice) for p in prompts]
    while sum(1 for p in c.ps() if p["tokens_out"] > 0) < min(slots, len(pids)):
        time.sleep(0.05)
    time.sleep(0.2)
    return pids


def stop_load(c, pids: list[int], max_tokens: int) -> None:
    done = [p for p in c.ps() if p["pid"] in set(pids) and p["tokens_out"] >= max_tokens]
    assert not done, "the load finished during the measurement: raise --load-tokens"
    for pid in pids:
        c.kill(pid, "KILL")
        c.wait(pid)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.add_model_args(ap)
    ap.add_argument("--load", type=int, default=48, help="low-priority processes")
    ap.add_argument("--load-nice", type=int, default=10)
    ap.add_argument("--probe-nice", type=int, default=-10)
    ap.add_argument("--load-prompt", type=int, default=64)
    ap.add_argument("--load-tokens", type=int, default=1024, help="output tokens per load process")
    ap.add_argument("--probe-len", type=int, default=128)
    ap.add_argument("--probes", type=int, default=9)
    ap.add_argument("--max-num-seqs", type=int, default=16, help="batch slots (< --load saturates)")
    ap.add_argument("--max-batched-tokens", type=int, default=1024)
    a = ap.parse_args()

    threads, device, dtype, path = bc.setup(a)
    vocab, _, _ = bc.model_info(path)
    load_prompts = bc.make_prompts(a.load, a.load_prompt, a.load_prompt, vocab, seed=1)
    # Every probe gets its own prompt, so the prefix cache never serves it.
    probes = bc.make_prompts(3 * a.probes + 1, a.probe_len, a.probe_len, vocab, seed=2)
    blocks = (a.load + 4) * -(-(a.load_prompt + a.load_tokens) // 16) + 64   # no preemption
    flags = ["--max-num-seqs", str(a.max_num_seqs), "--max-batched-tokens", str(a.max_batched_tokens),
             "--kv-blocks", str(blocks), "--block-size", "16"]
    k = bc.start_kernel(path, device, dtype, *flags)
    try:
        with k.client(timeout=600) as c:
            probe(c, probes.pop(), a.probe_nice)                               # warm-up
            unloaded = [probe(c, probes.pop(), a.probe_nice) for _ in range(a.probes)]
            results = {}
            for mode, nice in (("priority", a.probe_nice), ("fcfs", a.load_nice)):
                pids = start_load(c, load_prompts, a.load_tokens, a.load_nice, a.max_num_seqs)
                results[mode] = []
                for _ in range(a.probes):
                    results[mode].append(probe(c, probes.pop(), nice))
                    time.sleep(0.1)
                stop_load(c, pids, a.load_tokens)
    finally:
        k.cleanup()

    u, p, f = bc.med(unloaded), bc.med(results["priority"]), bc.med(results["fcfs"])
    ms = lambda xs: ", ".join(f"{x * 1e3:.0f}" for x in xs)       # noqa: E731
    print(f"priority: TTFT of a {a.probe_len}-token probe; load = {a.load} procs at nice {a.load_nice} "
          f"({a.load_prompt}-token prompts, long outputs) over {a.max_num_seqs} batch slots; model "
          f"{os.path.basename(path)} ({dtype}, {device}); {os.cpu_count()} cores, {threads}; median of {a.probes}")
    print(f"  kernel flags: {' '.join(flags)}")
    print(f"  unloaded (nice {a.probe_nice:>3})  {u * 1e3:8.1f} ms   probes: {ms(unloaded)}")
    print(f"  priority (nice {a.probe_nice:>3})  {p * 1e3:8.1f} ms   probes: {ms(results['priority'])}")
    print(f"  fcfs     (nice {a.load_nice:>3})  {f * 1e3:8.1f} ms   probes: {ms(results['fcfs'])}")
    print(f"  ratio priority/unloaded {p / u:6.2f}x   (target <= 2x: {'met' if p <= 2 * u else 'NOT met'})")
    print(f"  ratio fcfs/unloaded     {f / u:6.2f}x   (priority is {f / p:.1f}x faster than fcfs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
