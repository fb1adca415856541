"""The process journal's cost and its restore time.

    python bench/journal.py [--num-procs 64] [--max-tokens 64] [--repeat 3] [--restore-procs 1000]
                            [--model PATH | --shape bench-llama|tiny|qwen3-0.6b] [--device auto]

1. Throughput: the same workload as ``bench/throughput.py`` (spawn all, wait all, greedy, a fresh
   prompt set per run) on two kernels started alike, one with the journal at its default
   interval and one with ``--no-journal``, alternating run by run; medians and the ratio.
2. Restore: ``--restore-procs`` live processes (each with a long way to go), the kernel
   SIGKILLed and started again on the same state directory: seconds until it answers, and until
   every process is back and runnable (``ps`` lists them all, none lost).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import _common as bc
from throughput import add_workload_args, run_llmos


def restart(k) -> float:
    """SIGKILL ``k`` and start it again on its state directory; seconds until it answers."""
    k.stop(signal.SIGKILL)
    t0 = time.perf_counter()
    k.start(timeout=600)
    return time.perf_counter() - t0


def restore_time(path: str, device: str, dtype: str, num: int) -> tuple[float, float, float, int]:
    """(seconds to answer with no process to restore, to answer with ``num``, until all run, lost)."""
    k = bc.start_kernel(path, device, dtype, "--kv-blocks", "256", "--block-size", "16", "--max-num-seqs", "64")
    try:
        empty = restart(k)                       # the boot itself: imports, model load, its gate
        with k.client(timeout=600) as c:
            for i in range(num):
                c.spawn(prompt_ids=[1 + (i % 50), 2, 3, 4, 5, 6, 7, 8], max_tokens=4000, ignore_eos=True,
                        temperature=0.0)
        t0 = time.perf_counter()
        answered = restart(k)
        with k.client(timeout=600) as c:
            while True:
                rows = c.ps()
                if sum(1 for r in rows if r["state"] in ("READY", "RUNNING", "SWAPPED")) >= num:
                    return empty, answered, time.perf_counter() - t0, c.stat()["journal"]["lost"]
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"only {len(rows)} of {num} processes back after 600 s")
                time.sleep(0.2)
    finally:
        k.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap)
    ap.add_argument("--restore-procs", type=int, default=1000)
    ap.add_argument("--restore-only", action="store_true", help="skip the throughput comparison")
    a = ap.parse_args()
    threads, device, dtype, path = bc.setup(a)
    vocab, _, _ = bc.model_info(path)
    sets = [bc.make_prompts(a.num_procs, a.prompt_lo, a.prompt_hi, vocab, a.seed + r) for r in range(a.repeat + 1)]
    block = 16
    need = a.num_procs * -(-(a.prompt_hi + a.max_tokens) // block)
    flags = ["--max-num-seqs", str(max(a.num_procs, 1)), "--kv-blocks", str(need + 64), "--block-size", str(block)]
    if a.restore_only:
        return report_restore(a, path, device, dtype)
    on = bc.start_kernel(path, device, dtype, *flags)
    off = bc.start_kernel(path, device, dtype, *flags, "--no-journal")
    runs = {"journal": [], "none": []}
    try:
        with on.client(timeout=600) as c_on, off.client(timeout=600) as c_off:
            for c in (c_on, c_off):
                run_llmos(c, sets[0][: max(4, a.num_procs // 4)], 8)          # warm-up
            for r, ps in enumerate(sets[1:]):
                order = [("journal", c_on), ("none", c_off)][:: 1 if r % 2 == 0 else -1]
                for name, c in order:
                    runs[name].append(run_llmos(c, ps, a.max_tokens))
            commits = c_on.stat()["journal"]
    finally:
        on.cleanup()
        off.cleanup()
    j, n = bc.med(runs["journal"]), bc.med(runs["none"])
    print(f"journal: {a.num_procs} procs, prompts {a.prompt_lo}-{a.prompt_hi} tokens, {a.max_tokens} output "
          f"tokens each; model {os.path.basename(path)} ({dtype}, {device}); {os.cpu_count()} cores, {threads}; "
          f"median of {a.repeat}")
    print(f"  journal (interval {commits['interval_s']} s) {j:9.1f} output tok/s   runs: "
          f"{', '.join(f'{x:.1f}' for x in runs['journal'])}   ({commits['commits']} commits, "
          f"{commits['bytes_written']} bytes)")
    print(f"  --no-journal            {n:9.1f} output tok/s   runs: {', '.join(f'{x:.1f}' for x in runs['none'])}")
    ratio = bc.med([x / y for x, y in zip(runs["journal"], runs["none"])])
    print(f"  median of per-run ratios journal/none: {ratio:.3f}x   (target >= 0.95x: "
          f"{'met' if ratio >= 0.95 else 'NOT met'})")
    return report_restore(a, path, device, dtype)


def report_restore(a, path: str, device: str, dtype: str) -> int:
    if a.restore_procs:
        empty, answered, back, lost = restore_time(path, device, dtype, a.restore_procs)
        print(f"  restore of {a.restore_procs} live processes after SIGKILL: kernel answers in {answered:.1f} s "
              f"(target <= 10 s; with nothing to restore: {empty:.1f} s), all runnable in {back:.1f} s "
              f"(target <= 60 s), {lost} lost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
