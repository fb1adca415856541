"""Parallel sampling with fork: n different continuations of one prompt.

Shows: ``spawn(..., stopped=True)`` makes a process that waits STOPPED at its prompt;
``fork(pid, n=n-1, seed=s)`` clones it (child i samples with seed s+i, copy-on-write KV);
``kill(pid, "CONT")`` lets the parent run with its children; ``meminfo`` shows how many KV
blocks are shared while they run, and ``wait`` returns each sample with its usage
(``cached_tokens``: prompt tokens whose KV came from the prefix cache, not computed again).
Each sample is exactly what a single ``spawn`` with its seed would have produced.

    llmos run userland/programs/parallel_sampling.py -n 4 --temperature 0.9
"""
from __future__ import annotations

import argparse
import sys
import time

from llmos import connect

PROMPT = ("The old lighthouse keeper climbed the winding stairs every evening to light the lamp, "
          "and on the night of the great storm he saw")


def show(text: str) -> str:
    """Random weights emit control characters; keep the terminal sane."""
    return "".join(ch if ch.isprintable() else "·" for ch in text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("-n", type=int, default=4, help="number of samples")
    ap.add_argument("--seed", type=int, default=1, help="sample i uses seed+i")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args(argv)
    if not 1 <= a.n <= 65:
        ap.error("-n must be from 1 to 65 (fork makes at most 64 children)")

    with connect() as c:
        pid = c.spawn(prompt=a.prompt, max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed,
                      ignore_eos=True, stopped=True)
        kids = c.fork(pid, n=a.n - 1, seed=a.seed + 1) if a.n > 1 else []
        pids = [pid, *kids]
        print(f"spawned pid {pid} STOPPED at its prompt, forked {kids}; kill CONT {pid}")
        t0 = time.monotonic()
        c.kill(pid, "CONT")

        # While they run, watch the KV pool: blocks held by more than one sample are shared.
        peak_used = peak_shared = 0
        while any(r["state"] != "ZOMBIE" for r in c.ps() if r["pid"] in pids):
            mem = c.meminfo()
            peak_used, peak_shared = max(peak_used, mem["blocks_used"]), max(peak_shared, mem["blocks_shared"])
            time.sleep(0.005)
        results = [c.wait(p) for p in pids]
        elapsed = time.monotonic() - t0

    print(f"\n{a.n} samples at temperature {a.temperature} in {elapsed:.2f}s:")
    for p, r in zip(pids, results):
        u = r["usage"]
        print(f"  pid {p} (seed {a.seed + pids.index(p)}): {show(r['text'])!r}\n"
              f"      {u['prompt_tokens']} prompt tokens ({u['cached_tokens']} from the prefix cache), "
              f"{u['completion_tokens']} generated")
    distinct = len({tuple(r["token_ids"]) for r in results})
    cached = sum(r["usage"]["cached_tokens"] for r in results)
    print(f"\n{distinct} distinct samples of {a.n}")
    print(f"KV pool while running: at most {peak_used} blocks used, {peak_shared} shared between samples")
    print(f"prompt tokens not computed again thanks to shared/cached blocks: {cached} of "
          f"{sum(r['usage']['prompt_tokens'] for r in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
