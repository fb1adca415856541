"""KV memory utilization at saturation: paged blocks vs a contiguous (reserve-up-front) allocator.

    python bench/kv_utilization.py [--kv-blocks 256] [--num-procs 48] [--samples 60]
                                   [--model PATH | --shape bench-llama|tiny|qwen3-0.6b]

Far more KV demand than the pool holds (``--num-procs`` processes of up to
``--prompt-hi + --max-tokens`` tokens over ``--kv-blocks`` blocks of 16), so the pool stays
full and the scheduler preempts. While it is saturated (>= ``--full`` of the blocks in use)
we sample ``meminfo()`` (tokens stored / capacity of the used blocks) and, right after it,
``ps()`` (which processes hold device blocks). At the same moment a contiguous allocator
would hold the same tokens but reserve, for each of those processes, either its
prompt + max_tokens or the whole max_model_len; its utilization is stored / reserved.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import _common as bc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.add_model_args(ap)
    ap.add_argument("--kv-blocks", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-procs", type=int, default=48)
    ap.add_argument("--prompt-lo", type=int, default=128)
    ap.add_argument("--prompt-hi", type=int, default=384)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--samples", type=int, default=60, help="saturated samples to take")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    ap.add_argument("--full", type=float, default=0.9, help="blocks_used/blocks_total that counts as saturated")
    a = ap.parse_args()

    threads, device, dtype, path = bc.setup(a)
    vocab, max_pos, _ = bc.model_info(path)
    max_model_len = min(max_pos, a.kv_blocks * a.block_size)      # what the kernel will use
    prompts = bc.make_prompts(a.num_procs, a.prompt_lo, a.prompt_hi, vocab, seed=3)
    flags = ["--kv-blocks", str(a.kv_blocks), "--block-size", str(a.block_size),
             "--max-num-seqs", str(a.num_procs), "--max-batched-tokens", "512"]
    samples = []            # (paged utilization, blocks_used, blocks_total, contiguous exact, contiguous max_len, residents)
    k = bc.start_kernel(path, device, dtype, *flags)
    try:
        with k.client(timeout=600) as c:
            pids = [c.spawn(prompt_ids=p, max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
                    for p in prompts]
            demand = {pid: len(p) + a.max_tokens for pid, p in zip(pids, prompts)}
            deadline = time.monotonic() + 240
            while len(samples) < a.samples and time.monotonic() < deadline:
                m, ps = c.meminfo(), c.ps()
                if m["blocks_used"] >= a.full * m["blocks_total"]:
                    stored = m["utilization"] * m["blocks_used"] * m["block_size"]
                    resident = [p["pid"] for p in ps if p["kv_blocks"] > 0]
                    exact = sum(demand[pid] for pid in resident)
                    samples.append((m["utilization"], m["blocks_used"], m["blocks_total"],
                                    stored / exact, stored / (len(resident) * max_model_len),
                                    len(resident)))
                if all(p["state"] == "ZOMBIE" for p in ps):
                    break
                time.sleep(a.interval)
            stats = c.stat()
            live = {p["pid"] for p in c.ps() if p["state"] != "ZOMBIE"}
            for pid in pids:
                if pid in live:
                    c.kill(pid, "KILL")
                c.wait(pid)
    finally:
        k.cleanup()
    if not samples:
        print("kv_utilization: the pool never saturated; lower --kv-blocks or raise --num-procs")
        return 1

    col = lambda i: [s[i] for s in samples]      # noqa: E731
    paged, cont, cont_max = col(0), col(3), col(4)
    used = bc.med([s[1] / s[2] for s in samples])
    mean_demand = sum(demand.values()) / len(demand)
    print(f"kv_utilization: {a.num_procs} procs, prompts {a.prompt_lo}-{a.prompt_hi} + {a.max_tokens} "
          f"output tokens, pool {a.kv_blocks} blocks x {a.block_size} tokens; model "
          f"{os.path.basename(path)} ({dtype}, {device}); {os.cpu_count()} cores, {threads}")
    print(f"  kernel flags: {' '.join(flags)}   (kernel steps so far: {stats['steps']})")
    print(f"  {len(samples)} samples while saturated; blocks_used/blocks_total median {used:.3f} "
          f"(e.g. {samples[0][1]}/{samples[0][2]}); resident procs median {bc.med(col(5)):.0f}")
    print(f"  llmos paged            utilization min {min(paged):6.1%}  median {bc.med(paged):6.1%}")
    print(f"  contiguous, prompt+max utilization min {min(cont):6.1%}  median {bc.med(cont):6.1%}"
          f"   (same procs, same moment)")
    print(f"  contiguous, max_len    utilization min {min(cont_max):6.1%}  median {bc.med(cont_max):6.1%}"
          f"   (max_model_len {max_model_len})")
    print(f"  ratio paged / contiguous(prompt+max) {bc.med(paged) / bc.med(cont):.2f}x; "
          f"a contiguous pool of this size fits {a.kv_blocks * a.block_size / mean_demand:.1f} "
          f"procs of mean demand {mean_demand:.0f} tokens")
    ok = min(paged) >= 0.96
    print(f"  target: paged utilization >= 96% at saturation: {'met' if ok else 'NOT met'} (min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
