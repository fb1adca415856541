"""``TritonBackend``: the paged attention seam served by Triton kernels.

Same contract as ``llmos.drivers.attention.TorchBackend``: ``write`` stores a layer's new K/V
at the context's slots, ``attend`` returns [T, H, Dv] with every sequence attending causally to
its own blocks, under the layer's sliding window, attention soft-cap (Gemma 2) and sinks
(GPT-OSS); keys and values may have different head dims (DeepSeek's MLA). One ``attend`` call
launches at most four kernels, whatever the batch holds: the prefill kernel over every chunk
of more than one token, the decode kernel (split over the context, flash-decoding) and its
reduction over every single-token chunk.

Triton is imported only when a backend is made, so ``llmos.drivers`` imports without it; use
``available()`` to ask first. On CPU tensors the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` in the environment before the backend is made).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from llmos.drivers.attention import AttentionBackend, AttentionContext

LOG2E = 1.4426950408889634
MEMO_KEY = "triton"


def available() -> bool:
    """True when triton is installed and its kernels can run here: on a CUDA device, or on
    CPU through the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


@dataclass
class _PassPlan:
    """What every layer of one forward pass shares: the prefill work list and the decode
    split, built once per ``AttentionContext`` and kept in its memo."""
    work_seq: torch.Tensor | None       # [W] int32: prefill sequence of each query block
    work_block: torch.Tensor | None     # [W] int32: index of that block within the sequence
    q_start: torch.Tensor | None        # [Bp] int32: first row in the flat batch
    q_len: torch.Tensor | None          # [Bp] int32
    start_pos: torch.Tensor | None      # [Bp] int32
    prefill_table: torch.Tensor | None  # [Bp, max_blocks] long, padded with block 0
    num_decodes: int
    num_splits: int


class TritonBackend(AttentionBackend):
    """Paged attention in Triton. ``block_m``/``block_n`` tile the prefill (query rows x key
    rows), ``decode_block_n`` the decode's keys; ``num_splits`` fixes the decode split
    (default: enough programs to fill the GPU's SMs, at most 16 splits)."""
    name = "triton"

    def __init__(self, block_m: int = 64, block_n: int = 64, decode_block_n: int = 64,
                 num_splits: int | None = None, num_warps: int = 4):
        for tile in (block_m, block_n, decode_block_n):
            if tile < 16 or tile & (tile - 1):
                raise ValueError("tile sizes must be powers of two >= 16")
        if num_splits is not None and num_splits < 1:
            raise ValueError("num_splits must be >= 1")
        from llmos.drivers import triton_kernels     # imports triton
        self.kernels = triton_kernels
        self.block_m, self.block_n, self.decode_block_n = block_m, block_n, decode_block_n
        self.num_splits, self.num_warps = num_splits, num_warps

    # -- store ----------------------------------------------------------------------------

    def write(self, ctx: AttentionContext, layer_idx: int, key: torch.Tensor,
              value: torch.Tensor) -> None:
        """One launch stores K [T, Hkv, Dk] and V [T, Hkv, Dv] of all new tokens, cast to the
        cache dtype, straight from the strided views transformers hands us
        (``PagedKVCache.write`` takes two ``index_copy_`` launches, plus casts when dtypes
        differ). Negative slots are skipped."""
        k_cache, v_cache = ctx.cache.layer(layer_idx)           # [N, bs, Hkv, Dk], [.., Dv]
        key, value = _unit_last(key), _unit_last(value)
        num_tokens, num_kv_heads, head_dim = key.shape
        v_head_dim = value.shape[2]
        # Flat slots address [num_blocks * block_size] rows: blocks and rows must be dense.
        for cache in (k_cache, v_cache):
            assert cache.stride(3) == 1 and cache.stride(0) == cache.shape[1] * cache.stride(1)
        self.kernels.store_kv_kernel[(num_tokens,)](
            key, value, k_cache, v_cache, ctx.slot_mapping,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
            HKV=num_kv_heads, DK=head_dim, DV=v_head_dim, HKV_PAD=_pow2(num_kv_heads),
            DK_PAD=_pow2(head_dim), DV_PAD=_pow2(v_head_dim), num_warps=self.num_warps)

    # -- attend ---------------------------------------------------------------------------

    def attend(self, ctx, layer_idx, query, scaling, sliding_window, softcap=None, sinks=None):
        """``query`` [T, H, Dk] against the layer's K [.., Hkv, Dk] and V [.., Hkv, Dv]:
        returns [T, H, Dv]."""
        k_cache, v_cache = ctx.cache.layer(layer_idx)
        query = _unit_last(query)
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads, v_head_dim = k_cache.shape[2], v_cache.shape[3]
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} kv heads")
        if k_cache.shape[3] != head_dim:
            raise ValueError(f"queries have head dim {head_dim}, keys {k_cache.shape[3]}")
        if sinks is not None and tuple(sinks.shape) != (num_heads,):
            raise ValueError(f"sinks must be one logit per query head ({num_heads}), "
                             f"got shape {tuple(sinks.shape)}")
        scaling = head_dim ** -0.5 if scaling is None else scaling
        # What both attention kernels take: how scores are made, and the cache's geometry.
        layer = dict(
            qk_scale=scaling / softcap if softcap else scaling * LOG2E,
            cap_scale=softcap * LOG2E if softcap else 0.0, window=sliding_window or 0,
            stride_kb=k_cache.stride(0), stride_ks=k_cache.stride(1), stride_kh=k_cache.stride(2),
            stride_vb=v_cache.stride(0), stride_vs=v_cache.stride(1), stride_vh=v_cache.stride(2),
            GROUP=num_heads // num_kv_heads, BS=k_cache.shape[1], DK=head_dim,
            DK_PAD=_pow2(head_dim, 16), DV=v_head_dim, DV_PAD=_pow2(v_head_dim, 16),
            SOFTCAP=bool(softcap), num_warps=self.num_warps)
        # For the prefill and the reduction, which finish rows. Without sinks the kernels never
        # read sinks_ptr; any tensor stands in for it.
        sink_args = dict(sinks_ptr=query if sinks is None else sinks.contiguous(),
                         HAS_SINKS=sinks is not None)
        plan = self._plan(ctx, query.device, num_kv_heads)
        out = torch.empty(num_tokens, num_heads, v_head_dim, dtype=query.dtype,
                          device=query.device)
        if plan.work_seq is not None:
            self._prefill(plan, query, k_cache, v_cache, out, layer, sink_args)
        if plan.num_decodes:
            self._decode(ctx, plan, query, k_cache, v_cache, out, layer, sink_args)
        return out

    def _prefill(self, plan, query, k_cache, v_cache, out, layer, sink_args):
        table = plan.prefill_table
        self.kernels.paged_prefill_kernel[(plan.work_seq.numel(), query.shape[1])](
            query, k_cache, v_cache, out, table, plan.work_seq, plan.work_block,
            plan.q_start, plan.q_len, plan.start_pos,
            stride_qt=query.stride(0), stride_qh=query.stride(1), stride_ot=out.stride(0),
            stride_oh=out.stride(1), stride_tb=table.stride(0), BLOCK_M=self.block_m,
            BLOCK_N=self.block_n, **layer, **sink_args)

    def _decode(self, ctx, plan, query, k_cache, v_cache, out, layer, sink_args):
        heads, num_kv_heads, splits = query.shape[1], k_cache.shape[2], plan.num_splits
        dv_pad = layer["DV_PAD"]
        scratch_key = (MEMO_KEY, "scratch", heads, dv_pad)
        if scratch_key not in ctx.memo:         # layers run in turn: one scratch serves all
            ctx.memo[scratch_key] = (
                torch.empty(plan.num_decodes, splits, heads, dv_pad, dtype=torch.float32,
                            device=query.device),
                torch.empty(plan.num_decodes, splits, heads, dtype=torch.float32,
                            device=query.device))
        part_out, part_lse = ctx.memo[scratch_key]
        table, rows = ctx.decode_block_table, ctx.decode_rows
        self.kernels.paged_decode_kernel[(plan.num_decodes, num_kv_heads, splits)](
            query, k_cache, v_cache, table, ctx.decode_context_len, rows, part_out, part_lse,
            num_splits=splits, stride_qt=query.stride(0), stride_qh=query.stride(1),
            stride_tb=table.stride(0), H=heads, G_PAD=_pow2(layer["GROUP"], 16),
            BLOCK_N=self.decode_block_n, **layer)
        self.kernels.decode_reduce_kernel[(plan.num_decodes, heads)](
            part_out, part_lse, rows, out, out.stride(0), out.stride(1), splits,
            S_PAD=_pow2(splits), H=heads, DV=layer["DV"], DV_PAD=dv_pad,
            num_warps=self.num_warps, **sink_args)

    # -- per-pass plan --------------------------------------------------------------------

    def _plan(self, ctx: AttentionContext, device: torch.device, num_kv_heads: int) -> _PassPlan:
        """Built by the first layer of a pass, from host-side lists: one upload, no sync."""
        if MEMO_KEY in ctx.memo:
            return ctx.memo[MEMO_KEY]
        prefill = ctx.prefill_ids
        work_seq, work_block, q_start, q_len, start_pos = [], [], [], [], []
        for j, i in enumerate(prefill):
            n = ctx.query_start[i + 1] - ctx.query_start[i]
            q_start.append(ctx.query_start[i])
            q_len.append(n)
            start_pos.append(ctx.start_pos[i])
            for b in range(-(-n // self.block_m)):
                work_seq.append(j)
                work_block.append(b)
        num_decodes = 0 if ctx.decode_rows is None else ctx.decode_rows.numel()
        plan = _PassPlan(None, None, None, None, None, None, num_decodes,
                         self._splits(ctx, num_decodes, num_kv_heads, device))
        if prefill:
            packed = torch.tensor(work_seq + work_block + q_start + q_len + start_pos,
                                  dtype=torch.int32, device=device)
            w, p = len(work_seq), len(prefill)
            plan.work_seq, plan.work_block = packed[:w], packed[w:2 * w]
            plan.q_start, plan.q_len = packed[2 * w:2 * w + p], packed[2 * w + p:2 * w + 2 * p]
            plan.start_pos = packed[2 * w + 2 * p:]
            plan.prefill_table = torch.nn.utils.rnn.pad_sequence(
                [ctx.block_tables[i] for i in prefill], batch_first=True)
        ctx.memo[MEMO_KEY] = plan
        return plan

    def _splits(self, ctx: AttentionContext, num_decodes: int, num_kv_heads: int,
                device: torch.device) -> int:
        """Split each decode's keys so that decodes x kv heads x splits fills the SMs, with
        at least two key tiles per split; a power of two, at most 16."""
        if self.num_splits is not None:
            return self.num_splits
        if num_decodes == 0 or device.type != "cuda":
            return 1
        prefill = set(ctx.prefill_ids)
        longest = max(n for i, n in enumerate(ctx.context_len) if i not in prefill)
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = math.ceil(num_sms / (num_decodes * num_kv_heads))
        most = max(1, longest // (2 * self.decode_block_n))
        return min(16, _pow2(min(want, most)))


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels address rows and heads by stride but need the last dim dense."""
    return x if x.stride(-1) == 1 else x.contiguous()
