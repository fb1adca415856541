"""Triton kernels for paged attention: the store, the decode and the prefill.

Importing this module imports triton; only ``llmos.drivers.triton_attention`` does, and only
when a ``TritonBackend`` is made. Under ``TRITON_INTERPRET=1`` (set before this import) the
same kernels run on CPU tensors through Triton's interpreter, which is how the tests check them.

Shared conventions. The cache of one layer is K ``[num_blocks, block_size, Hkv, DK]`` and V
``[num_blocks, block_size, Hkv, DV]`` (queries have DK too; DV may differ, as in DeepSeek's
MLA, and the output has DV); a token at sequence position ``p`` lives in block
``table[p // BS]``, row ``p % BS``. Keys are gathered one token row at a time, so a KV tile
(``BLOCK_N`` tokens) may span several cache blocks and any block size works (a power of two
makes ``// BS`` a shift). Head dims are padded to ``DK_PAD``/``DV_PAD`` (powers of two) with masks.
Scores are kept in the log2 domain and accumulated in fp32: a score is ``q.k * qk_scale``
(``qk_scale`` = scaling * log2(e)), or with a soft-cap (``SOFTCAP``, Gemma 2)
``cap_scale * tanh(q.k * qk_scale)`` (``qk_scale`` = scaling / softcap, ``cap_scale`` =
softcap * log2(e)), computed in fp32 before the mask.
Attention sinks (``HAS_SINKS``: one logit per query head, natural-log domain as transformers
keeps them; GPT-OSS) are one more term of a row's softmax denominator. They enter only where a
row's softmax is finished — the end of the prefill, the decode's reduction over splits — never
per key tile or per split, so each counts exactly once.
A sliding window ``window > 0`` lets a query at ``q`` see keys ``p`` with ``q - window < p <= q``.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                    stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_cks, stride_ckh, stride_cvs, stride_cvh,
                    HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    HKV_PAD: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr):
    """One program per new token: K rows [Hkv, DK] and V rows [Hkv, DV] to flat cache slot
    ``slot[t]`` (``stride_c?s`` = one slot, i.e. Hkv*D for a contiguous cache). Negative slots
    are skipped."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, HKV_PAD)[:, None]
        dk = tl.arange(0, DK_PAD)[None, :]
        dv = tl.arange(0, DV_PAD)[None, :]
        k_mask = (h < HKV) & (dk < DK)
        v_mask = (h < HKV) & (dv < DV)
        k = tl.load(key_ptr + t * stride_kt + h * stride_kh + dk, mask=k_mask)
        v = tl.load(value_ptr + t * stride_vt + h * stride_vh + dv, mask=v_mask)
        tl.store(k_cache_ptr + slot * stride_cks + h * stride_ckh + dk,
                 k.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(v_cache_ptr + slot * stride_cvs + h * stride_cvh + dv,
                 v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 (libdevice's has no interpreter path): odd, and stable for any
    |x| since the exponent is never positive."""
    t = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _attend_tile(q, acc, l_i, m_i, k_cache_ptr, v_cache_ptr, table_row_ptr, kv_head, tok,
                 in_range, allowed, qk_scale, cap_scale,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 BS: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr,
                 DV_PAD: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with one tile of keys at positions ``tok``
    [BLOCK_N]. Only keys ``in_range`` [BLOCK_N] are read (they lie inside the sequence's block
    table); ``allowed`` [M, BLOCK_N] masks scores, after the soft-cap."""
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    block = tl.load(table_row_ptr + tok // BS, mask=in_range, other=0).to(tl.int64)
    row = tok % BS
    k = tl.load(k_cache_ptr + (block * stride_kb + row * stride_ks + kv_head * stride_kh)[:, None]
                + dk[None, :], mask=in_range[:, None] & (dk[None, :] < DK), other=0.0)
    v = tl.load(v_cache_ptr + (block * stride_vb + row * stride_vs + kv_head * stride_vh)[:, None]
                + dv[None, :], mask=in_range[:, None] & (dv[None, :] < DV), other=0.0)
    s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision="ieee") * qk_scale
    if SOFTCAP:
        s = _tanh(s) * cap_scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)          # rows with nothing yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, l_i, m_new


@triton.jit
def paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, ctx_len_ptr, row_ptr,
                        part_out_ptr, part_lse_ptr, qk_scale, cap_scale, window, num_splits,
                        stride_qt, stride_qh, stride_tb,
                        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                        H: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                        BS: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr,
                        DV: tl.constexpr, DV_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Grid (decodes, kv heads, splits). One query token per sequence; the GROUP query heads
    sharing a kv head are the rows of one tile, so each K/V tile is loaded once per group.
    The visible keys are split in ``num_splits`` contiguous ranges (flash-decoding); each program
    writes its normalised partial output [GROUP, DV] and log-sum-exp (no sink: the reduction
    adds it) to fp32 scratch ``part_out [decodes, splits, H, DV_PAD]`` / ``part_lse [decodes,
    splits, H]``."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(ctx_len_ptr + b).to(tl.int32)
    row = tl.load(row_ptr + b).to(tl.int64)
    lo = tl.where(window > 0, tl.maximum(ctx_len - window, 0), 0)
    per_split = tl.cdiv(tl.cdiv(ctx_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx_len)

    g = tl.arange(0, G_PAD)
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + dk[None, :],
                mask=g_mask[:, None] & (dk[None, :] < DK), other=0.0)
    acc = tl.zeros([G_PAD, DV_PAD], dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    table_row_ptr = table_ptr + b.to(tl.int64) * stride_tb
    for n in range(start, end, BLOCK_N):
        tok = n + tl.arange(0, BLOCK_N)
        in_range = tok < end
        allowed = g_mask[:, None] & in_range[None, :]
        acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, k_cache_ptr, v_cache_ptr, table_row_ptr,
                                     kv_head, tok, in_range, allowed, qk_scale, cap_scale,
                                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                     stride_vh, BS, DK, DK_PAD, DV, DV_PAD, SOFTCAP)
    empty = l_i == 0.0                                               # split past the context
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    part = (b * num_splits + split).to(tl.int64) * H + heads
    tl.store(part_out_ptr + part[:, None] * DV_PAD + dv[None, :], out, mask=g_mask[:, None])
    tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit
def decode_reduce_kernel(part_out_ptr, part_lse_ptr, row_ptr, out_ptr, stride_ot, stride_oh,
                         num_splits, sinks_ptr, S_PAD: tl.constexpr, H: tl.constexpr,
                         DV: tl.constexpr, DV_PAD: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Grid (decodes, heads): weight each split's partial output by exp2(lse), divide by the
    weights plus the head's sink (counted here, once), and store the result in the query's row
    of ``out`` (cast to its dtype)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, DV_PAD)
    part = (b * num_splits + s).to(tl.int64) * H + h
    lse = tl.load(part_lse_ptr + part, mask=s < num_splits, other=float("-inf"))
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * LOG2E
        top = tl.maximum(tl.max(lse, axis=0), sink)
        sink_weight = tl.exp2(sink - top)
    else:
        top = tl.max(lse, axis=0)                                    # split 0 is never empty
        sink_weight = 0.0
    w = tl.exp2(lse - top)
    o = tl.load(part_out_ptr + part[:, None] * DV_PAD + d[None, :],
                mask=(s < num_splits)[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / (tl.sum(w, axis=0) + sink_weight)
    row = tl.load(row_ptr + b).to(tl.int64)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < DV)


@triton.jit
def paged_prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, table_ptr,
                         work_seq_ptr, work_block_ptr, q_start_ptr, q_len_ptr, start_pos_ptr,
                         sinks_ptr, qk_scale, cap_scale, window,
                         stride_qt, stride_qh, stride_ot, stride_oh, stride_tb,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         GROUP: tl.constexpr, BS: tl.constexpr, DK: tl.constexpr,
                         DK_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
                         SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (work items, query heads); work item w is query block ``work_block[w]`` of prefill
    sequence ``work_seq[w]``. Its BLOCK_M new tokens attend causally to the sequence's KV in the
    cache — cached prefix and this pass's tokens alike, since ``write`` ran first."""
    w = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(work_seq_ptr + w)
    m0 = tl.load(work_block_ptr + w) * BLOCK_M
    q_start = tl.load(q_start_ptr + seq).to(tl.int64)
    q_len = tl.load(q_len_ptr + seq)
    start_pos = tl.load(start_pos_ptr + seq)
    kv_head = head // GROUP

    m = m0 + tl.arange(0, BLOCK_M)
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    m_mask = m < q_len
    q_pos = start_pos + m
    q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + head * stride_qh + dk[None, :],
                mask=m_mask[:, None] & (dk[None, :] < DK), other=0.0)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    hi = start_pos + tl.minimum(m0 + BLOCK_M, q_len)                 # last query position + 1
    lo = tl.where(window > 0, tl.maximum(start_pos + m0 - window + 1, 0), 0)
    table_row_ptr = table_ptr + seq.to(tl.int64) * stride_tb
    for n in range(lo, hi, BLOCK_N):
        tok = n + tl.arange(0, BLOCK_N)
        allowed = (m_mask[:, None] & (tok[None, :] <= q_pos[:, None])
                   & ((window <= 0) | (tok[None, :] > q_pos[:, None] - window)))
        acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, k_cache_ptr, v_cache_ptr, table_row_ptr,
                                     kv_head, tok, tok < hi, allowed, qk_scale, cap_scale,
                                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                     stride_vh, BS, DK, DK_PAD, DV, DV_PAD, SOFTCAP)
    if HAS_SINKS:                  # the sink joins the finished row's denominator (it is finite)
        sink = tl.load(sinks_ptr + head).to(tl.float32) * LOG2E
        m_all = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_all)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.exp2(sink - m_all)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + head * stride_oh + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (dv[None, :] < DV))
