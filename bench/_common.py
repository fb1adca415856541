"""Shared pieces of the generation benchmarks: the model under test, prompts, a kernel.

Models are built once under ``$LLMOS_BENCH_MODELS`` (default ``/tmp/llmos-bench-models``) and
reused by later runs. Timings on a shared machine are noisy: the scripts report medians.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import KernelProc  # noqa: E402  (the tests' kernel launcher)

MODEL_DIR = Path(os.environ.get("LLMOS_BENCH_MODELS", "/tmp/llmos-bench-models"))

# A small Llama whose compute is not trivial on a CPU: ~2.6M parameters beside the embeddings.
BENCH_LLAMA = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                   max_position_embeddings=2048)

# Random weights in the shape of Qwen3-0.6B (for GPU runs); the tokenizer stays the offline one.
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=True,
                 rope_theta=1000000.0, rms_norm_eps=1e-6)


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help="an existing checkpoint directory (overrides --shape)")
    ap.add_argument("--shape", default="bench-llama", choices=("bench-llama", "tiny", "qwen3-0.6b"),
                    help="random model to build: bench-llama (CPU default), tiny (the built-in "
                         "default model), qwen3-0.6b (bf16, for GPUs)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default=None, help="default: bf16 on cuda, float32 on cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch, the same in the kernel and in HF "
                         "(OMP_NUM_THREADS); 0 = torch's default. The default, 1, keeps timings "
                         "steady on a small shared machine, where two OpenMP threads stall "
                         "whenever another tenant takes a core")


def apply_threads(args) -> str:
    """Give the kernel (via its environment) and this process the same torch thread count."""
    import torch
    if args.threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    return f"{torch.get_num_threads()} torch threads per side"


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | None, device: str) -> str:
    return dtype or ("bfloat16" if device == "cuda" else "float32")


def setup(args) -> tuple[str, str, str, str]:
    """From the shared model arguments: (threads line, device, dtype, model path)."""
    threads = apply_threads(args)
    device = resolve_device(args.device)
    return threads, device, resolve_dtype(args.dtype, device), model_path(args)


def model_path(args) -> str:
    """The checkpoint to benchmark, built on first use for the random shapes."""
    if args.model:
        return args.model
    from llmos.drivers.default_model import ensure_default_model, make_tiny_model
    if args.shape == "tiny":
        return ensure_default_model(MODEL_DIR)        # exactly the kernel's built-in model
    if args.shape == "bench-llama":
        return make_tiny_model("llama", MODEL_DIR / "bench-llama-256x4", **BENCH_LLAMA)
    return _make_qwen3_06b(MODEL_DIR / "random-qwen3-0.6b")


def _make_qwen3_06b(path: Path) -> str:
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return str(path)
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config
    from llmos.drivers.default_model import SEED, build_tokenizer
    tmp = path.with_name(path.name + ".partial")
    tok = build_tokenizer(tmp)
    cfg = Qwen3Config(**QWEN3_06B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(tmp), safe_serialization=True)
    os.replace(tmp, path)
    return str(path)


def model_info(path: str) -> tuple[int, int, int]:
    """(vocab_size, max_position_embeddings, pad_token_id) from the checkpoint's config."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(path).get_text_config()
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return cfg.vocab_size, cfg.max_position_embeddings, pad


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of random ids in [10, vocab-1) (clear of special tokens), lengths in [lo, hi]."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 1) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def start_kernel(path: str, device: str, dtype: str, *flags: str) -> KernelProc:
    return KernelProc("--device", device, "--dtype", dtype, *flags, model=path).start(timeout=600)


def first_token_latency(c, pid: int, t0: float) -> float:
    """Seconds from ``t0`` until the first streamed frame of ``pid`` carrying a token."""
    import time
    for frame in c.read(pid):
        if frame.get("token_ids"):
            return time.perf_counter() - t0
    raise RuntimeError(f"pid {pid} ended without a token")


def med(xs) -> float:
    return statistics.median(xs)


def start_service_kernel(*services: str, timeout: float = 120.0) -> KernelProc:
    """A kernel without a model, running the named services; returns once all are ``up``."""
    import time
    flags = [f for name in services for f in ("--service", name)]
    k = KernelProc(*flags).start(timeout=timeout)
    deadline = time.monotonic() + timeout
    with k.client() as c:
        while True:
            up = {row["name"] for row in c.svc_list() if row["state"] == "up"}
            if up >= set(services):
                return k
            if time.monotonic() > deadline:
                k.cleanup()
                raise RuntimeError(f"services {sorted(set(services) - up)} did not come up")
            time.sleep(0.05)


def percentile(xs, q: float) -> float:
    """The ``q``-th percentile (0-100) of ``xs``, nearest-rank."""
    import math
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]
