"""Multi-LoRA serving: llmos batches processes of many adapters together vs peft serving the
adapters one after another.

    python bench/lora_batch.py [--adapters 8] [--procs-per-adapter 8] [--prompt-lo 32 --prompt-hi 64]
                               [--max-tokens 64] [--rank 16] [--repeat 3]
                               [--model PATH | --shape bench-llama|tiny|qwen3-0.6b] [--device auto]

``--adapters`` peft LoRA adapters (random non-zero A and B, ``init_lora_weights=False``, rank
``--rank`` on q/k/v/o, one seed each) on one base model (default: the bench Llama, hidden 256, 4
layers, fp32), built once under ``$LLMOS_BENCH_MODELS``. Every adapter serves
``--procs-per-adapter`` prompts of random ids (fresh per repeat), exactly ``--max-tokens``
greedy output tokens each (EOS ignored).

llmos: a kernel with ``--adapter-slots`` = the number of adapters; spawn every process at once,
each with its adapter's directory, then wait all; tokens/s of wall time from the first spawn to
the last reply. peft: one ``PeftModel`` holding every adapter (``load_adapter``); for each
adapter in turn ``set_adapter`` and ``generate`` its prompts as one left-padded batch; tokens/s of
the total wall time. Medians of ``--repeat`` runs after one untimed warm-up per side (which
also loads the adapters into the kernel); the sides alternate run by run.

Correctness: for one process per adapter of the last run, llmos's greedy tokens must equal that
adapter's peft ``generate`` on the same prompt alone (no padding), all ``--max-tokens`` of them.
"""
from __future__ import annotations

import argparse
import os
import warnings
import sys
import time
from pathlib import Path

import _common as bc

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapters(base: str, n: int, rank: int, targets: list[str]) -> list[str]:
    """``n`` peft adapters for ``base`` (seed i for adapter i), built once each."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    root = bc.MODEL_DIR / f"{Path(base).name}-lora-r{rank}-{'-'.join(targets)}"
    paths = []
    for i in range(n):
        out = root / f"adapter-{i}"
        if not (out / "adapter_model.safetensors").exists():
            torch.manual_seed(1000 + i)
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            cfg = LoraConfig(init_lora_weights=False, r=rank, lora_alpha=2 * rank,
                             target_modules=targets)
            get_peft_model(model, cfg).save_pretrained(str(out))
        paths.append(str(out))
    return paths


def run_llmos(c, jobs: list[tuple[str, list[int]]], max_tokens: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    pids = [c.spawn(prompt_ids=p, adapter=a, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            for a, p in jobs]
    outs = [c.wait(pid) for pid in pids]
    wall = time.perf_counter() - t0
    n = sum(len(o["token_ids"]) for o in outs)
    assert n == max_tokens * len(jobs), f"llmos produced {n} tokens"
    return n / wall, [o["token_ids"] for o in outs]


def peft_generate(model, name: str, prompts: list[list[int]], max_tokens: int, pad_id: int, device):
    """One left-padded batch under adapter ``name``: the new tokens of each prompt."""
    import torch
    model.set_adapter(name)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_tokens, eos_token_id=None, pad_token_id=pad_id)
    return out[:, width:]


def run_peft(model, names: list[str], jobs: list[tuple[str, list[int]]], max_tokens: int,
             pad_id: int, device) -> float:
    import torch
    n = 0
    t0 = time.perf_counter()
    for name, path in names:
        out = peft_generate(model, name, [p for a, p in jobs if a == path], max_tokens, pad_id, device)
        n += out.numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    assert n == max_tokens * len(jobs), f"peft produced {n} tokens"
    return n / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.add_model_args(ap)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--procs-per-adapter", type=int, default=8)
    ap.add_argument("--prompt-lo", type=int, default=32)
    ap.add_argument("--prompt-hi", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-batched-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)     # transformers' deprecations
    threads, device, dtype, path = bc.setup(a)
    vocab, _, pad_id = bc.model_info(path)
    adapters = make_adapters(path, a.adapters, a.rank, TARGETS)
    names = [(f"a{i}", p) for i, p in enumerate(adapters)]
    nprocs = a.adapters * a.procs_per_adapter

    def jobs_for(seed: int) -> list[tuple[str, list[int]]]:
        prompts = bc.make_prompts(nprocs, a.prompt_lo, a.prompt_hi, vocab, seed)
        # Interleaved: consecutive spawns use different adapters, as independent clients would.
        return [(adapters[i % a.adapters], p) for i, p in enumerate(prompts)]

    job_sets = [jobs_for(a.seed + r) for r in range(a.repeat + 1)]          # set 0: warm-up

    block = 16
    need = nprocs * -(-(a.prompt_hi + a.max_tokens) // block)
    flags = ["--adapter-slots", str(a.adapters), "--max-num-seqs", str(nprocs),
             "--kv-blocks", str(need + 64), "--block-size", str(block),
             "--max-batched-tokens", str(a.max_batched_tokens)]
    tdev = torch.device(device)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(tdev)
    model = PeftModel.from_pretrained(base, names[0][1], adapter_name=names[0][0])
    for name, p in names[1:]:
        model.load_adapter(p, adapter_name=name)
    model = model.to(tdev).eval()

    k = bc.start_kernel(path, device, dtype, *flags)
    llmos, peft, outs = [], [], []
    try:
        with k.client(timeout=600) as c:
            run_llmos(c, job_sets[0], 4)                                        # warm-up
            run_peft(model, names, job_sets[0], 4, pad_id, tdev)
            for jobs in job_sets[1:]:
                tps, outs = run_llmos(c, jobs, a.max_tokens)
                llmos.append(tps)
                peft.append(run_peft(model, names, jobs, a.max_tokens, pad_id, tdev))
            row = {m["name"]: m for m in c.models()}[path]
            loaded = len(row.get("adapters", []))
    finally:
        k.cleanup()

    # Correctness: the first process of each adapter in the last run vs peft on that prompt alone.
    checked = 0
    for i, (name, apath) in enumerate(names):
        j = next(j for j, (ap_, _) in enumerate(job_sets[-1]) if ap_ == apath)
        prompt = job_sets[-1][j][1]
        want = peft_generate(model, name, [prompt], a.max_tokens, pad_id, tdev)[0].tolist()
        assert len(outs[j]) == a.max_tokens and outs[j] == want, \
            f"adapter {name}: llmos {outs[j]} != peft {want}"
        checked += 1

    l_med, p_med = bc.med(llmos), bc.med(peft)
    print(f"lora_batch: {a.adapters} adapters x {a.procs_per_adapter} processes = {nprocs}, prompts "
          f"{a.prompt_lo}-{a.prompt_hi} tokens, {a.max_tokens} output tokens each; LoRA r={a.rank} on "
          f"{','.join(TARGETS)}; model {os.path.basename(path)} ({dtype}, {device}); "
          f"{os.cpu_count()} cores, {threads}; median of {a.repeat}")
    print(f"  llmos kernel flags: {' '.join(flags)}  ({loaded} adapters loaded in the kernel)")
    peft_label = f"peft (adapter by adapter, b={a.procs_per_adapter})"
    print(f"  {f'llmos (all {nprocs} at once)':<34}{l_med:9.1f} output tok/s   "
          f"runs: {', '.join(f'{x:.1f}' for x in llmos)}")
    print(f"  {peft_label:<34}{p_med:9.1f} output tok/s   "
          f"runs: {', '.join(f'{x:.1f}' for x in peft)}")
    print(f"  median of per-run ratios llmos/peft: {bc.med([x / y for x, y in zip(llmos, peft)]):.2f}x")
    target = "GPU target >= 3x" if device == "cuda" else "CPU: recorded only; the >= 3x target is for GPUs"
    print(f"  ratio llmos / peft    {l_med / p_med:7.2f}x   ({target})")
    print(f"  correctness: {checked}/{a.adapters} adapters, one process each: llmos greedy == peft "
          f"generate on the same prompt, all {a.max_tokens} tokens: matched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
