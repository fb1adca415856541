"""The load-time gate: a model serves only if the paged path computes what the model itself does.

At load the driver runs a short sequence through the paged path exactly as the scheduler would
— a prefill in two chunks (the second crossing a block boundary and attending to the first's
cached KV), then single-token decode steps — and compares the logits at every position with
the model's own forward pass over the whole sequence (its standard attention, no cache). A
model whose attention does not go through the paged interface, keeps state outside the KV pool
(recurrent or linear-attention layers), rescales its logits after the LM head, or fails on a
step at all, differs or raises here and is refused with the reason, instead of being accepted
and silently wrong. It costs a few forward passes of 21 tokens; ``check_cached`` skips it when
the same checkpoint passed before under the same conditions (see ``fingerprint``).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch
import transformers

from llmos.drivers import attention
from llmos.drivers.batch import SeqChunk

log = logging.getLogger("llmos.driver")
FIRST_CHUNK, SECOND_CHUNK, NUM_DECODES = 9, 8, 4          # 21 tokens
# Largest relative logit error the paged path may show: float rounding of a different but
# exact computation. A model attending to the wrong tokens is off by tens of percent.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def cache_dir() -> Path:
    """Where passes are remembered: ``$LLMOS_SELFCHECK_CACHE``, else ``~/.cache/llmos/selfcheck``."""
    return Path(os.environ.get("LLMOS_SELFCHECK_CACHE") or Path.home() / ".cache" / "llmos" / "selfcheck")


def fingerprint(driver, model_path: str) -> str:
    """What decides the check's outcome: the checkpoint's files (names, sizes, modification
    times: no need to read gigabytes), the dtype, device kind, block size and attention backend,
    the torch and transformers versions, and this driver's own source."""
    h = hashlib.sha256()
    root = Path(model_path).resolve()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(f"{root}|{driver._torch_dtype}|{driver.device.kind}|{driver.block_size}|{driver.backend.name}|"
             f"{torch.__version__}|{transformers.__version__}".encode())
    h.update(_source_digest())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _source_digest() -> bytes:
    """The driver's own source, read once per process."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))).digest()


STEPWISE = "passed stepwise"


def check_cached(driver, model_path: str) -> None:
    """``check``, skipped when this fingerprint passed before (remembering whether it passed
    ``stepwise``); a refusal is never cached."""
    try:
        mark = cache_dir() / fingerprint(driver, model_path)
        if mark.exists():
            driver.stepwise = mark.read_text().strip().endswith(STEPWISE)
            return
    except OSError:
        mark = None
    check(driver)
    if mark is not None:
        try:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(f"{driver.architecture} {STEPWISE if driver.stepwise else 'passed'}\n")
        except OSError as exc:              # a read-only home: the check runs on every load
            log.warning("cannot remember the load-time check's pass in %s: %s", mark.parent, exc)


def check(driver) -> None:
    """Raise ``ValueError`` naming why ``driver``'s model cannot be served exactly. Recurrent
    layers that differ only where a chunk continues a saved state (their code scans a chunk
    from a zero state) pass ``stepwise``: such chunks then run one token per pass, as
    ``generate`` decodes."""
    try:
        _compare(driver)
    except ValueError as exc:
        if driver.recurrent is None or driver.stepwise or "second prefill chunk" not in str(exc):
            raise
        driver.stepwise = True
        try:
            _compare(driver)
        except ValueError:
            driver.stepwise = False
            raise exc from None
        log.info("%s: recurrent layers continue a saved state one token at a time", driver.architecture)


def _compare(driver) -> None:
    vocab = driver.config.get_text_config().vocab_size
    total = min(FIRST_CHUNK + SECOND_CHUNK + NUM_DECODES, driver.max_model_len)
    ids = [(3 + 7 * i) % vocab for i in range(total)]
    try:
        paged = _paged_logits(driver, ids)
        own = _own_logits(driver, ids)
    except Exception as exc:
        raise ValueError(f"{driver.architecture}: the paged path fails on a test sequence at load "
                         f"({type(exc).__name__}: {exc})"[:400]) from exc
    scale = own.abs().max().item() or 1.0
    errors = ((paged - own).abs().amax(dim=-1) / scale).tolist()
    limit = TOLERANCE.get(driver._torch_dtype, 5e-2)
    bad = [i for i, e in enumerate(errors) if not e <= limit]
    if bad:
        i = bad[0]
        where = ("in the prefill" if i < FIRST_CHUNK else "in a second prefill chunk" if i < FIRST_CHUNK + SECOND_CHUNK
                 else "in a decode step")
        raise ValueError(f"{driver.architecture}: the paged path differs from the model's own forward pass "
                         f"{where} (position {i}: relative logit error {errors[i]:.3g} > {limit:g}); "
                         + ("its recurrent layers do not continue exactly from their saved state" if driver.recurrent
                            else "its attention does not go through transformers' attention interface or it "
                                 "keeps state outside the KV cache"))


@torch.inference_mode()
def _paged_logits(driver, ids: list[int]) -> torch.Tensor:
    num_blocks = driver.blocks_for(len(ids))
    saved, driver.kv = driver.kv, None
    try:
        driver.allocate_kv(num_blocks, 0)
        table = list(range(num_blocks))
        spans = [(0, FIRST_CHUNK), (FIRST_CHUNK, FIRST_CHUNK + SECOND_CHUNK)]
        spans += [(p, p + 1) for p in range(FIRST_CHUNK + SECOND_CHUNK, len(ids))]
        hidden = [driver.forward([SeqChunk(pid=0, token_ids=ids[a:b], start_pos=a, block_ids=table)])[0]
                  for a, b in spans]
        return driver.logits(torch.cat(hidden))
    finally:
        driver.kv = saved


@torch.inference_mode()
def _own_logits(driver, ids: list[int]) -> torch.Tensor:
    """The model's forward pass with its standard attention (sdpa, else eager)."""
    model = driver.model
    for impl in ("sdpa", "eager"):
        try:
            model.set_attn_implementation(impl)
            break
        except (ValueError, ImportError):
            continue
    try:
        x = torch.tensor([ids], device=driver.device.torch_device)
        return model(input_ids=x, use_cache=False).logits[0].float()
    finally:
        model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
