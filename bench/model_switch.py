"""Model switching: cold ``model_load`` from disk and warm ``model_load`` back from host memory,
through the kernel, vs a plain in-process ``AutoModelForCausalLM.from_pretrained``.

    python bench/model_switch.py [--model PATH] [--repeat 3] [--kv-blocks 64] [--device auto]

X is the checkpoint under test (``--model``, else a random Llama of hidden 768, 12 layers, fp32,
~77M parameters, ~290 MiB, built once under ``$LLMOS_BENCH_MODELS``). Y is the same checkpoint
under another name (a temporary directory of symlinks to X's files), so the kernel sees two
models of one size. The kernel boots on the built-in tiny model with a ``--device-budget``
computed from the checkpoint sizes to hold the boot model plus exactly one of X / Y (weights + a
``--kv-blocks`` KV pool each).

Each repeat: (a) cold ``model_load(X)`` with X on disk (the syscall round trip: read the
checkpoint, build the driver, allocate its KV pool); (b) ``model_load(Y)``, which must evict X to
host memory (checked with ``models()``: X ``where == "host"``); (c) warm ``model_load(X)`` back
from host (Y goes to host in turn); then both are unloaded (dropped to disk) for the next repeat.
(d) In the same run, in this process: ``from_pretrained(X)`` (+ ``.to(device)``). One untimed
warm-up round per side first. "Disk" reads come from the OS page cache after the first read on
both sides (dropping caches needs root and would disturb other tenants), so cold times are the
deserialization + construction cost, not the disk's speed.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import _common as bc

# Big enough that a load takes measurable time on a CPU: ~77M parameters, ~290 MiB in fp32.
SWITCH_LLAMA = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                    max_position_embeddings=2048)
BLOCK = 16
RESERVE_FRACTION = 0.05        # kernel.loop.KernelConfig.reserve_fraction: never allocated


def checkpoint_bytes(path: str, dtype_bytes: int) -> int:
    """Parameter bytes of ``path`` at the load dtype (safetensors headers only)."""
    from safetensors import safe_open
    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                sl = st.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * dtype_bytes
    return total


def kv_pool_bytes(path: str, kv_blocks: int, dtype_bytes: int) -> int:
    from transformers import AutoConfig
    t = AutoConfig.from_pretrained(path).get_text_config()
    kv_heads = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return kv_blocks * BLOCK * t.num_hidden_layers * 2 * kv_heads * head_dim * dtype_bytes


def alias_dir(src: str, root: Path) -> str:
    """A second model directory whose files are symlinks to ``src``'s: same weights, new name."""
    dst = root / (Path(src).name + "-as-Y")
    dst.mkdir()
    for f in Path(src).iterdir():
        if f.is_file():
            (dst / f.name).symlink_to(f.resolve())
    return str(dst)


def where(c, name: str) -> str:
    return {m["name"]: m["where"] for m in c.models()}.get(name, "unknown")


def timed_load(c, name: str) -> float:
    t0 = time.perf_counter()
    row = c.model_load(name)
    dt = time.perf_counter() - t0
    assert row["where"] == "device", row
    return dt


def switch_round(c, x: str, y: str) -> tuple[float, float]:
    """(cold, warm) seconds of ``model_load(X)``; leaves X and Y on disk."""
    assert where(c, x) in ("disk", "unknown") and where(c, y) in ("disk", "unknown")
    cold = timed_load(c, x)
    c.model_load(y)
    assert (where(c, x), where(c, y)) == ("host", "device"), c.models()
    warm = timed_load(c, x)
    assert (where(c, x), where(c, y)) == ("device", "host"), c.models()
    c.model_unload(x)
    c.model_unload(y)
    return cold, warm


def mmapped_fraction(model) -> float | None:
    """Share of parameters whose storage lies in a file mapping (weights not copied, only
    mmapped from the safetensors file); None where /proc/self/maps is not available."""
    try:
        maps = []
        for line in open("/proc/self/maps"):
            parts = line.split()
            if len(parts) > 5 and parts[5].endswith(".safetensors"):
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                maps.append((lo, hi))
    except OSError:
        return None
    ptrs = [p.data_ptr() for p in model.parameters()]
    return sum(any(lo <= q < hi for lo, hi in maps) for q in ptrs) / max(1, len(ptrs))


def hf_load(path: str, dtype, device) -> tuple[float, float | None]:
    """(seconds, mmapped fraction of the loaded parameters)."""
    import torch
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    frac = mmapped_fraction(model)
    del model
    gc.collect()
    return dt, frac


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint X to switch (default: a random Llama 768x12, fp32)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default=None, help="default: bf16 on cuda, float32 on cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch on both sides (0 = torch's default)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kv-blocks", type=int, default=64, help="KV pool of every model, in 16-token blocks")
    a = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging
    from llmos.drivers.default_model import make_tiny_model
    hf_logging.disable_progress_bar()
    threads = bc.apply_threads(a)
    device = bc.resolve_device(a.device)
    dtype = bc.resolve_dtype(a.dtype, device)
    dbytes = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    x = a.model or make_tiny_model("llama", bc.MODEL_DIR / "switch-llama-768x12", **SWITCH_LLAMA)
    boot = make_tiny_model("llama", bc.MODEL_DIR / "llmos-tiny-random")
    tmp = Path(tempfile.mkdtemp(prefix="llmos-switch-"))
    y = alias_dir(x, tmp)

    # Budget: the boot model + one of X / Y (weights + KV pool each) + half of another, so X and
    # Y never fit together; divided by (1 - reserve) since the kernel keeps a reserve back.
    boot_need = checkpoint_bytes(boot, dbytes) + kv_pool_bytes(boot, a.kv_blocks, dbytes)
    x_need = checkpoint_bytes(x, dbytes) + kv_pool_bytes(x, a.kv_blocks, dbytes)
    budget = int((boot_need + 1.5 * x_need) / (1 - RESERVE_FRACTION)) + 1
    flags = ["--kv-blocks", str(a.kv_blocks), "--block-size", str(BLOCK),
             "--device-budget", str(budget)]

    tdev = torch.device(device)
    tdtype = getattr(torch, dtype)
    cold, warm, hf = [], [], []
    k = bc.start_kernel(boot, device, dtype, *flags)
    try:
        with k.client(timeout=600) as c:
            switch_round(c, x, y)                               # warm-up (reads metadata once)
            _, mmapped = hf_load(x, tdtype, tdev)
            for _ in range(a.repeat):
                co, wa = switch_round(c, x, y)
                cold.append(co)
                warm.append(wa)
                hf.append(hf_load(x, tdtype, tdev)[0])
            # What the kernel itself counts (from the last loads), to show the budget's fit.
            c.model_load(x)
            rows = {m["name"]: m for m in c.models()}
            free = c.free()
    finally:
        k.cleanup()
        for f in tmp.glob("*/*"):
            f.unlink()
        for d in tmp.glob("*"):
            d.rmdir()
        tmp.rmdir()

    b_row, x_row = rows[boot], rows[x]
    kb, kx = b_row["bytes"] + b_row["kv_bytes"], x_row["bytes"] + x_row["kv_bytes"]
    usable = free["device"]["budget"] - free["device"]["reserve"]
    assert kb + kx <= usable < kb + 2 * kx, (kb, kx, usable)
    c_med, w_med, h_med = bc.med(cold), bc.med(warm), bc.med(hf)
    mb = 1 / 2 ** 20
    print(f"model_switch: X = {os.path.basename(x)} ({x_row['params'] / 1e6:.1f}M params, "
          f"{x_row['bytes'] * mb:.0f} MiB weights, {dtype}, {device}); Y = X under another name; "
          f"{os.cpu_count()} cores, {threads}; median of {a.repeat}")
    print(f"  llmos kernel flags: {' '.join(flags)}  (boot model {os.path.basename(boot)})")
    print(f"  kernel's counts: boot {kb * mb:.1f} MiB, X {kx * mb:.1f} MiB (weights + KV) per model; "
          f"budget less reserve {usable * mb:.1f} MiB: boot + one of X/Y fits, not both")
    print(f"  (a) llmos cold model_load(X), disk -> device  {c_med * 1e3:8.1f} ms   "
          f"runs: {', '.join(f'{v * 1e3:.1f}' for v in cold)}")
    print(f"  (b) model_load(Y) evicted X: models() says X where=host (checked every repeat)")
    print(f"  (c) llmos warm model_load(X), host -> device  {w_med * 1e3:8.1f} ms   "
          f"runs: {', '.join(f'{v * 1e3:.1f}' for v in warm)}")
    print(f"  (d) HF from_pretrained(X) in-process          {h_med * 1e3:8.1f} ms   "
          f"runs: {', '.join(f'{v * 1e3:.1f}' for v in hf)}")
    print(f"  ratio cold / from_pretrained  {c_med / h_med:6.2f}x")
    print(f"  ratio warm / from_pretrained  {w_med / h_med:6.2f}x")
    if mmapped:
        print(f"  note: from_pretrained left {mmapped:.0%} of X's parameters mmapped from the safetensors "
              "file (no copy at load; pages come in from the page cache on first touch), so (d) is "
              "mostly module construction")
    if device == "cpu":
        print("  note: CPU only, so 'host' and 'device' are the same RAM: a warm load is only the "
              "kernel's bookkeeping + .to('cpu') (a no-op) + a fresh KV pool; on a GPU it is a "
              "host->device copy of the weights. 'Disk' reads come from the OS page cache on both sides.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
