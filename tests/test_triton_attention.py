"""The Triton attention backend computes what the torch reference computes: the same cache
contents after ``write``, the same outputs from ``attend`` (decodes, prefills, mixed batches,
chunked prefill over a cached prefix, GQA, sliding windows, any block size and head dim, keys
and values of different head dims, attention soft-caps and sinks), and the same greedy tokens
as transformers' ``generate`` when it serves a whole model.

The kernels run on CPU through Triton's interpreter. Triton reads ``TRITON_INTERPRET`` when
it decorates a ``@triton.jit`` function, its own library (``tl.cdiv``, ``tl.max``) included,
and torch imports triton along with transformers: the variable must be set before the first
test module imports torch, i.e. in ``conftest.py``. This module sets it too, so it runs alone
by name; if triton was loaded without it, every test here fails saying so. Nothing else in the
suite runs triton, so the variable is harmless to the rest. Triton is a test dependency:
without it this module fails, it never skips.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402,F401  (a missing triton is a failure, not a skip)
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from fixtures_models import (NUM_BLOCKS, NUM_HOST_BLOCKS, ToyScheduler, hf_greedy,  # noqa: E402
                             prompt_of, tiny_models)  # noqa: F401  (fixture)
from llmos.drivers.attention import AttentionContext, TorchBackend  # noqa: E402
from llmos.drivers.batch import SeqChunk  # noqa: E402
from llmos.drivers.device import detect  # noqa: E402
from llmos.drivers.kv_cache import PagedKVCache  # noqa: E402
from llmos.drivers.model import ModelDriver  # noqa: E402
from llmos.drivers.triton_attention import TritonBackend, available  # noqa: E402

POOL_BLOCKS = 64

# Default tiles (as on a GPU) and small ones, so queries span several query blocks, keys many
# key tiles, and decodes several splits (3: not a power of two).
BACKENDS = {"default": dict(), "small": dict(block_m=16, block_n=16, decode_block_n=16,
                                              num_splits=3)}

# (start_pos, num_tokens) per sequence; lengths are odd and cross block boundaries.
DECODES = [(0, 1), (6, 1), (16, 1), (37, 1)]
PREFILLS = [(0, 7), (0, 19), (0, 33)]
MIXED = [(0, 5), (12, 1), (0, 1), (0, 21), (40, 1)]
CHUNKED = [(13, 13), (26, 11), (5, 2)]          # new tokens after a cached prefix

# A soft-cap that bends most scores (q.k * 0.3 has a std near 1.7 at head dim 32), and sinks
# that differ per head and weigh about as much as a window's keys.
SCORES = {"plain": dict(), "softcap": dict(softcap=2.0), "sinks": dict(with_sinks=True),
          "softcap+sinks": dict(softcap=2.0, with_sinks=True)}


@pytest.fixture(autouse=True)
def interpreted_triton():
    """Every test here needs triton's library built for the interpreter (see the docstring)."""
    if not isinstance(tl.cdiv, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it at the top "
                    "of tests/conftest.py, before anything imports torch")


def make_batch(layout, block_size, num_heads=4, num_kv_heads=2, head_dim=32, v_head_dim=None,
               dtype=torch.float32, seed=0):
    """A cache full of random K/V (so a wrong gather shows), chunks on shuffled block ids,
    and random query/key/value for the new tokens (values of ``v_head_dim``, else ``head_dim``)."""
    gen = torch.Generator().manual_seed(seed)
    v_head_dim = v_head_dim or head_dim
    cache = PagedKVCache(1, POOL_BLOCKS, 0, block_size, num_kv_heads, head_dim, dtype,
                         detect("cpu"), v_head_dim=v_head_dim)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    free = list(range(POOL_BLOCKS))
    random.Random(seed).shuffle(free)
    chunks = []
    for pid, (start, n) in enumerate(layout):
        num_blocks = -(-(start + n) // block_size)
        chunks.append(SeqChunk(pid, [0] * n, start, free[:num_blocks]))
        free = free[num_blocks:]
    num_tokens = sum(n for _, n in layout)
    q, k, v = (torch.randn(num_tokens, h, d, generator=gen).to(dtype)
               for h, d in ((num_heads, head_dim), (num_kv_heads, head_dim),
                            (num_kv_heads, v_head_dim)))
    return cache, chunks, q, k, v


def run(backend, cache, chunks, q, k, v, window, scaling=None, softcap=None, sinks=None):
    """Write then attend, as ``paged_attention_forward`` does; returns (output, cache)."""
    ctx = AttentionContext.build(chunks, cache, backend)
    ctx.new_key, ctx.new_value = k, v
    backend.write(ctx, 0, k, v)
    return backend.attend(ctx, 0, q, scaling, window, softcap, sinks), cache


def padded(x, dim):
    """``x`` in float32 with zero columns up to head dim ``dim``."""
    return F.pad(x.float(), (0, dim - x.shape[-1]))


def assert_matches_torch(layout, block_size, window, tiles, atol=1e-4, softcap=None,
                         with_sinks=False, **shape):
    """Triton on ``shape``'s dtype against the torch reference in float32. The reference runs
    at one head dim, max(Dk, Dv), on zero-padded copies: zero columns change neither a score
    nor the first Dv columns of the output, so Dk != Dv is checked by plain TorchBackend."""
    cache, chunks, q, k, v = make_batch(layout, block_size, **shape)
    num_heads, dim, v_head_dim = q.shape[1], max(k.shape[-1], v.shape[-1]), v.shape[-1]
    sinks = torch.linspace(-1.0, 4.0, num_heads).to(q.dtype) if with_sinks else None
    reference = PagedKVCache(1, POOL_BLOCKS, 0, block_size, k.shape[1], dim, torch.float32,
                             detect("cpu"))
    reference.k.copy_(padded(cache.k, dim)), reference.v.copy_(padded(cache.v, dim))
    out, cache = run(TritonBackend(**BACKENDS[tiles]), cache, chunks, q, k, v, window, 0.3,
                     softcap, sinks)
    expected, reference = run(TorchBackend(), reference, chunks,
                              *(padded(x, dim) for x in (q, k, v)), window, 0.3, softcap, sinks)
    assert torch.equal(padded(cache.k, dim), reference.k)
    assert torch.equal(padded(cache.v, dim), reference.v)
    torch.testing.assert_close(out.float(), expected[..., :v_head_dim], atol=atol, rtol=atol)


grid = pytest.mark.parametrize("block_size,window,tiles", [
    (4, None, "default"), (4, 5, "small"), (16, None, "small"), (16, 5, "default"),
    (4, None, "small"), (16, 17, "small"), (5, 6, "small")])


@grid
def test_decode_only_batch_matches_torch(block_size, window, tiles):
    assert_matches_torch(DECODES, block_size, window, tiles)


@grid
def test_prefill_only_batch_matches_torch(block_size, window, tiles):
    assert_matches_torch(PREFILLS, block_size, window, tiles)


@grid
def test_mixed_prefill_and_decode_batch_matches_torch(block_size, window, tiles):
    assert_matches_torch(MIXED, block_size, window, tiles)


@grid
def test_chunked_prefill_over_cached_prefix_matches_torch(block_size, window, tiles):
    assert_matches_torch(CHUNKED, block_size, window, tiles)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [
    (4, 4, 16), (6, 3, 32), (8, 2, 64), (16, 8, 128), (4, 2, 48), (3, 1, 24)])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_head_layouts_and_dims_match_torch(num_heads, num_kv_heads, head_dim, tiles):
    """Plain MHA, GQA groups of 2 to 4 (3 kv heads: not a power of two), the Qwen3-0.6B
    shape (16 x 8 x 128) and head dims that need padding (48, 24)."""
    assert_matches_torch(MIXED, 4, None, tiles, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, head_dim=head_dim)


@pytest.mark.parametrize("scores", ["plain", "softcap+sinks"])
def test_float16_cache_matches_torch_within_half_precision(scores):
    """16-bit path (probabilities rounded to the cache dtype before P @ V; float16 sinks, as
    such a model holds them). bfloat16 cannot be checked here: the interpreter's ``tl.dot``
    multiplies bf16 bit patterns (triton#11584)."""
    assert_matches_torch(MIXED + CHUNKED, 4, 5, "small", atol=3e-3, dtype=torch.float16,
                         **SCORES[scores])


@pytest.mark.parametrize("scores,block_size,window,tiles", [
    ("softcap", 4, None, "small"), ("softcap", 5, 6, "small"), ("sinks", 4, None, "small"),
    ("sinks", 5, 6, "small"), ("softcap+sinks", 4, None, "small"),
    ("softcap+sinks", 16, 17, "default")])
def test_soft_caps_and_sinks_match_torch(scores, block_size, window, tiles):
    """Every path in one batch: prefills, chunks over a cached prefix, and decodes (small tiles
    split a 41-token decode three ways, and under a window leave splits empty: a sink counted
    per split instead of once, in the reduction, shows). GQA groups of 3."""
    assert_matches_torch(MIXED + CHUNKED, block_size, window, tiles, num_heads=6,
                         num_kv_heads=2, **SCORES[scores])


@pytest.mark.parametrize("head_dim,v_head_dim,scores,window,tiles", [
    (24, 16, "plain", None, "default"), (16, 24, "plain", 6, "small"),
    (24, 16, "softcap+sinks", 6, "small"), (40, 8, "softcap+sinks", None, "default")])
def test_key_and_value_head_dims_may_differ(head_dim, v_head_dim, scores, window, tiles):
    """DeepSeek's MLA: queries and keys of Dk, values and output of Dv (24 and 40 are not
    powers of two, 8 is under ``tl.dot``'s 16: all are padded and masked)."""
    assert_matches_torch(MIXED + CHUNKED, 4, window, tiles, head_dim=head_dim,
                         v_head_dim=v_head_dim, **SCORES[scores])


def test_sinks_must_be_one_logit_per_query_head():
    cache, chunks, q, k, v = make_batch(MIXED, 4)
    with pytest.raises(ValueError, match="one logit per query head"):
        run(TritonBackend(), cache, chunks, q, k, v, None, sinks=torch.zeros(2))


def test_default_scaling_is_inverse_sqrt_head_dim():
    cache, chunks, q, k, v = make_batch(MIXED, 4)
    reference = PagedKVCache(1, POOL_BLOCKS, 0, 4, 2, 32, torch.float32, detect("cpu"))
    reference.k.copy_(cache.k), reference.v.copy_(cache.v)
    out, _ = run(TritonBackend(), cache, chunks, q, k, v, None, scaling=None)
    expected, _ = run(TorchBackend(), reference, chunks, q, k, v, None, scaling=None)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_strided_inputs_like_transformers_views_match_torch():
    """transformers hands [T, H, D] views of [1, H, T, D] tensors: rows are not contiguous."""
    cache, chunks, q, k, v = make_batch(CHUNKED, 16)
    reference = PagedKVCache(1, POOL_BLOCKS, 0, 16, 2, 32, torch.float32, detect("cpu"))
    reference.k.copy_(cache.k), reference.v.copy_(cache.v)
    q_view, k_view, v_view = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))
    assert q_view.stride(0) != q_view.shape[1] * q_view.shape[2]
    out, _ = run(TritonBackend(), cache, chunks, q_view, k_view, v_view, None)
    expected, _ = run(TorchBackend(), reference, chunks, q, k, v, None)
    torch.testing.assert_close(cache.k, reference.k, atol=0, rtol=0)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_tiles_must_be_powers_of_two_of_at_least_16():
    for bad in (dict(block_m=8), dict(block_n=48), dict(decode_block_n=0), dict(num_splits=0)):
        with pytest.raises(ValueError):
            TritonBackend(**bad)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_greedy_with_triton_backend_matches_hf_generate(arch, tiny_models):
    """A chunked prefill next to a plain one, then batched decodes (mistral: a 16-token
    sliding window, which the 23-token prompt crosses)."""
    path = tiny_models[arch]
    driver = ModelDriver(path, device="cpu", dtype="float32", block_size=4,
                         backend=TritonBackend())
    driver.allocate_kv(NUM_BLOCKS, NUM_HOST_BLOCKS)
    sched = ToyScheduler(driver)
    long_prompt, short_prompt = prompt_of(23, 1), prompt_of(9, 2)
    chunked = sched.add(1, long_prompt, 4, chunk=10)
    other = sched.add(2, short_prompt, 4)
    sched.run()
    assert chunked.output == hf_greedy(path, long_prompt, 4)
    assert other.output == hf_greedy(path, short_prompt, 4)


def test_drivers_import_and_report_unavailable_without_triton():
    """``llmos.drivers`` never imports triton: with triton missing the model driver and this
    backend's module still import, ``available()`` says no and making a backend raises."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import llmos.drivers.model\n"
            "from llmos.drivers import triton_attention as t\n"
            "assert not t.available()\n"
            "try:\n    t.TritonBackend()\nexcept ImportError:\n    print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_available_under_the_interpreter():
    assert available()
