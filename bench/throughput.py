"""Output throughput: llmos (continuous batching, paged KV) vs HF ``generate`` in static batches.

    python bench/throughput.py [--num-procs 64] [--prompt-lo 32 --prompt-hi 256]
                               [--max-tokens 64] [--hf-batch 16] [--repeat 3]
                               [--model PATH | --shape bench-llama|tiny|qwen3-0.6b] [--device auto]

Both sides get the same prompts (random ids, fixed seed, a fresh set per repeat so the
kernel's prefix cache never helps), exactly ``--max-tokens`` greedy output tokens each, the
same weights and dtype. llmos: spawn all, then wait all; tokens/s of wall time from the first
spawn to the last reply. HF: ``model.generate`` over left-padded batches of ``--hf-batch``,
one after the other; tokens/s of the total wall time. Medians of ``--repeat`` runs, after one
untimed warm-up run per side; the sides alternate run by run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import _common as bc


def run_llmos(c, prompts: list[list[int]], max_tokens: int) -> float:
    t0 = time.perf_counter()
    pids = [c.spawn(prompt_ids=p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            for p in prompts]
    outs = [c.wait(pid) for pid in pids]
    wall = time.perf_counter() - t0
    n = sum(len(o["token_ids"]) for o in outs)
    assert n == max_tokens * len(prompts), f"llmos produced {n} tokens"
    return n / wall


def run_hf(model, prompts: list[list[int]], max_tokens: int, batch: int, pad_id: int, device) -> float:
    import torch
    n = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        group = prompts[i:i + batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 min_new_tokens=max_tokens, max_new_tokens=max_tokens,
                                 pad_token_id=pad_id)
        n += (out.shape[1] - width) * len(group)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    assert n == max_tokens * len(prompts), f"HF produced {n} tokens"
    return n / wall


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The model and the workload (also ``bench/journal.py``'s)."""
    bc.add_model_args(ap)
    ap.add_argument("--num-procs", type=int, default=64)
    ap.add_argument("--prompt-lo", type=int, default=32)
    ap.add_argument("--prompt-hi", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--max-batched-tokens", type=int, default=1024)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    threads, device, dtype, path = bc.setup(a)
    vocab, _, pad_id = bc.model_info(path)
    prompt_sets = [bc.make_prompts(a.num_procs, a.prompt_lo, a.prompt_hi, vocab, a.seed + r)
                   for r in range(a.repeat + 1)]          # set 0 is the warm-up

    # Enough KV for every process at once: llmos never preempts in this benchmark.
    block = 16
    need = a.num_procs * -(-(a.prompt_hi + a.max_tokens) // block)
    flags = ["--max-num-seqs", str(max(a.num_procs, 1)), "--kv-blocks", str(need + 64),
             "--block-size", str(block), "--max-batched-tokens", str(a.max_batched_tokens)]
    # HF runs in this process while the kernel idles; the two sides alternate run by run so
    # that load from other tenants of a shared machine hits both alike.
    tdev = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(tdev).eval()
    k = bc.start_kernel(path, device, dtype, *flags)
    llmos, hf = [], []
    try:
        with k.client(timeout=600) as c:
            run_llmos(c, prompt_sets[0][: max(4, a.num_procs // 4)], 8)      # warm-up
            run_hf(model, prompt_sets[0][: a.hf_batch], 8, a.hf_batch, pad_id, tdev)
            for ps in prompt_sets[1:]:
                llmos.append(run_llmos(c, ps, a.max_tokens))
                hf.append(run_hf(model, ps, a.max_tokens, a.hf_batch, pad_id, tdev))
    finally:
        k.cleanup()

    l_med, h_med = bc.med(llmos), bc.med(hf)
    print(f"throughput: {a.num_procs} procs, prompts {a.prompt_lo}-{a.prompt_hi} tokens, "
          f"{a.max_tokens} output tokens each; model {os.path.basename(path)} ({dtype}, {device}); "
          f"{os.cpu_count()} cores, {threads}; median of {a.repeat}")
    print(f"  llmos kernel flags: {' '.join(flags)}")
    print(f"  llmos               {l_med:9.1f} output tok/s   runs: {', '.join(f'{x:.1f}' for x in llmos)}")
    print(f"  HF generate (b={a.hf_batch:<3}) {h_med:9.1f} output tok/s   runs: {', '.join(f'{x:.1f}' for x in hf)}")
    pairs = bc.med([x / y for x, y in zip(llmos, hf)])
    print(f"  median of per-run ratios llmos/HF: {pairs:.2f}x")
    print(f"  ratio llmos / HF    {l_med / h_med:9.2f}x   (target >= 1.0x: {'met' if l_med >= h_med else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
