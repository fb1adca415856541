"""Fair share between users: a second user's request latency beside a flood from the first.

    python bench/fairness.py [--flood 1000] [--max-num-seqs 64] [--probes 5]
                             [--model PATH | --shape tiny|bench-llama|qwen3-0.6b] [--device auto]

User bob sends ``--probe-tokens``-token requests (``spawn`` + ``wait``, greedy, one after
another); user alice loads the kernel. Four measurements, medians of ``--probes``:

1. unloaded: bob alone;
2. batch: beside one full batch of alice's (``--max-num-seqs`` long-running processes);
3. flood, fair share: alice has ``--flood`` live long-running processes, and 8 threads of hers
   send ``nop`` as fast as the kernel answers;
4. flood, no fair share: the same on a kernel started with ``--no-fair-share`` (users served by
   arrival, as before fair share). A probe that does not end within ``--unfair-timeout`` counts
   as that long (a lower bound).

Total throughput (tokens generated per second, from the kernel's ``stat``) is measured over the
first ``--window`` seconds of each loaded phase (the same span after the load starts running, so
both floods are compared at the same context lengths). Targets: flood/batch <= 1.5 with fair share (the flood's size does not matter, only the
batch's), and fair-share throughput >= 0.9x the unfair run's.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import _common as bc
from llmos import SyscallError


class NopStream:
    """``n`` threads, each with its own connection, calling ``nop`` until stopped."""

    def __init__(self, k, token: str, n: int = 8):
        self.stop, self.count = threading.Event(), [0] * n
        self.threads = [threading.Thread(target=self._run, args=(k, token, i), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, k, token: str, i: int) -> None:
        with k.client(token) as c:
            while not self.stop.is_set():
                c.nop()
                self.count[i] += 1

    def close(self) -> int:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return sum(self.count)


def probe(bob, prompt: list[int], tokens: int, timeout: float) -> float:
    t0 = time.perf_counter()
    pid = bob.spawn(prompt_ids=prompt, max_tokens=tokens, ignore_eos=True)
    try:
        bob.wait(pid, timeout=timeout)
    except SyscallError as err:
        if err.errno != "ETIMEDOUT":
            raise
        bob.kill(pid, "KILL")
        bob.wait(pid)
        return timeout
    return time.perf_counter() - t0


def measure(k, bob, prompts, a, timeout: float) -> tuple[list[float], float]:
    """Bob's probe latencies, and the kernel's total tokens/s over the first ``a.window`` s."""
    rate = []

    def sample():
        with k.client() as root:
            t0, before = time.perf_counter(), root.stat()["tokens_generated"]
            time.sleep(a.window)
            rate.append((root.stat()["tokens_generated"] - before) / (time.perf_counter() - t0))
    sampler = threading.Thread(target=sample)
    sampler.start()
    lat = [probe(bob, prompts.pop(), a.probe_tokens, timeout) for _ in range(a.probes)]
    sampler.join()
    return lat, rate[0]


def load(alice, prompts, n: int, tokens: int) -> list[int]:
    """``n`` long-running processes of alice's, spawned 32 at a time (the load starts at once)."""
    args = ({"prompt_ids": prompts[i % len(prompts)], "max_tokens": tokens, "ignore_eos": True} for i in range(n))
    return list(alice.pipeline("spawn", args, window=32))


def unload(alice, pids: list[int]) -> None:
    for pid in pids:
        try:
            alice.kill(pid, "KILL")
        except SyscallError:
            pass                          # it finished: reap it all the same
        alice.wait(pid)


def run_kernel(path, device, dtype, flags, a, prompts, load_prompts, phases) -> dict:
    k = bc.start_kernel(path, device, dtype, *flags)
    out = {}
    try:
        with k.client(timeout=600) as root:
            alice = k.client(root.user_add("alice")["token"], timeout=600)
            bob = k.client(root.user_add("bob")["token"], timeout=600)
            probe(bob, prompts.pop(), a.probe_tokens, 600)                       # warm-up
            for phase in phases:
                timeout = a.unfair_timeout if phase == "unfair" else 600.0
                if phase == "unloaded":
                    out[phase] = measure(k, bob, prompts, a, timeout)
                    continue
                n = a.max_num_seqs if phase == "batch" else a.flood
                pids = load(alice, load_prompts, n, a.load_tokens)
                while sum(1 for p in alice.ps() if p["tokens_out"] > 0) < a.max_num_seqs:
                    time.sleep(0.05)      # the batch is full and running
                nops = NopStream(k, alice.token) if phase != "batch" else None
                out[phase] = measure(k, bob, prompts, a, timeout)
                live = sum(1 for p in alice.ps() if p["state"] != "ZOMBIE")
                if nops is not None:
                    out[phase + "_nops"] = nops.close()
                out[phase + "_live"] = live
                unload(alice, pids)
    finally:
        k.cleanup()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.add_model_args(ap)
    ap.set_defaults(shape="tiny")
    ap.add_argument("--flood", type=int, default=1000, help="alice's live processes in the flood")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--probes", type=int, default=5)
    ap.add_argument("--probe-tokens", type=int, default=16)
    ap.add_argument("--probe-len", type=int, default=16, help="prompt tokens of a probe")
    ap.add_argument("--load-tokens", type=int, default=1500, help="output tokens per load process")
    ap.add_argument("--unfair-timeout", type=float, default=10.0, help="seconds a probe may wait without fair share")
    ap.add_argument("--window", type=float, default=5.0, help="seconds over which throughput is measured")
    a = ap.parse_args()

    threads, device, dtype, path = bc.setup(a)
    vocab, max_pos, _ = bc.model_info(path)
    prompts = bc.make_prompts(4 * a.probes + 4, a.probe_len, a.probe_len, vocab, seed=2)
    load_prompts = bc.make_prompts(256, 8, 8, vocab, seed=1)
    tokens = min(a.load_tokens, max_pos - 16)
    a.load_tokens = tokens
    blocks = (a.max_num_seqs + 8) * -(-(8 + tokens) // 16) + 64
    flags = ["--max-num-seqs", str(a.max_num_seqs), "--kv-blocks", str(blocks), "--block-size", "16",
             "--max-procs-per-user", str(a.flood + 16)]
    fair = run_kernel(path, device, dtype, flags, a, prompts, load_prompts, ("unloaded", "batch", "flood"))
    unfair = run_kernel(path, device, dtype, flags + ["--no-fair-share"], a, prompts, load_prompts, ("unfair",))

    (u, _), (b, rb), (f, rf), (n, rn) = fair["unloaded"], fair["batch"], fair["flood"], unfair["unfair"]
    ms = lambda xs: ", ".join(f"{x * 1e3:.0f}" for x in xs)       # noqa: E731
    print(f"fairness: bob's {a.probe_tokens}-token request (spawn + wait) beside alice's load; model "
          f"{os.path.basename(path)} ({dtype}, {device}); {os.cpu_count()} cores, {threads}; median of {a.probes}")
    print(f"  kernel flags: {' '.join(flags)}; alice's processes: 8-token prompts, {tokens} output tokens")
    print(f"  unloaded                       {bc.med(u) * 1e3:9.1f} ms   probes: {ms(u)}")
    print(f"  beside one full batch ({a.max_num_seqs:>4})    {bc.med(b) * 1e3:9.1f} ms   probes: {ms(b)}   "
          f"{rb:8.1f} tok/s")
    print(f"  flood, fair share              {bc.med(f) * 1e3:9.1f} ms   probes: {ms(f)}   {rf:8.1f} tok/s   "
          f"({fair['flood_live']} live, {fair['flood_nops']} nops)")
    print(f"  flood, no fair share          {'>' if max(n) >= a.unfair_timeout else ' '}{bc.med(n) * 1e3:9.1f} ms"
          f"   probes: {ms(n)}   {rn:8.1f} tok/s   ({unfair['unfair_live']} live, {unfair['unfair_nops']} nops)")
    ratio, tput = bc.med(f) / bc.med(b), rf / rn
    print(f"  flood/batch latency (fair)     {ratio:6.2f}x   (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    print(f"  throughput fair/unfair         {tput:6.2f}x   (target >= 0.9x: {'met' if tput >= 0.9 else 'NOT met'})")
    print(f"  no fair share / fair share     {bc.med(n) / bc.med(f):6.1f}x slower for bob")
    return 0


if __name__ == "__main__":
    sys.exit(main())
