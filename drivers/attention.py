"""Paged attention: how the kernel's KV blocks reach an unmodified transformers model.

The model driver registers ``paged_attention_forward`` under ``ATTN_IMPLEMENTATION`` in
transformers' ``AttentionInterface`` and loads models with that implementation. Every
attention layer then calls us with its fresh query/key/value; the batch layout (which rows of
the flat token sequence belong to which process, where their KV lives) is not in the model's
arguments but in an ``AttentionContext`` that the driver installs around the forward pass
with ``use_context``. A ContextVar rather than kwargs, because every architecture forwards
the context unchanged that way, whatever its modeling code does with ``**kwargs``.

The function writes the new K/V into the ``PagedKVCache`` (slot mapping) and asks the
``AttentionBackend`` to attend over each sequence's cached prefix. ``TorchBackend`` is the
plain-torch reference; faster backends (Triton) implement the same two methods.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from llmos.drivers.batch import SeqChunk
from llmos.drivers.kv_cache import PagedKVCache
from llmos.drivers.probe import ATTRIBUTE as KV_LAYER, Probe

ATTN_IMPLEMENTATION = "llmos_paged"


@dataclass
class AttentionContext:
    """The layout of one forward pass over ``T`` packed tokens from ``B`` sequences.

    Per sequence ``i``: its query rows are ``query_start[i] : query_start[i+1]`` of the flat
    batch, its first new token sits at position ``start_pos[i]``, and after this pass it has
    ``context_len[i] = start_pos[i] + num_tokens`` tokens of KV in ``block_tables[i]``.
    Decodes (one token) are also listed as ``decode_*`` tensors so backends can attend to them
    in one call; the rest are in ``prefill_ids``.
    """
    cache: PagedKVCache
    backend: "AttentionBackend"
    slot_mapping: torch.Tensor                 # [T] long: cache slot of every new token
    query_start: list[int]                     # B+1 offsets into the flat batch
    start_pos: list[int]
    context_len: list[int]
    block_tables: list[torch.Tensor]           # B tensors of block ids (long, on device)
    prefill_ids: list[int]                     # sequences with more than one new token
    decode_rows: torch.Tensor | None           # [Bd] row in the flat batch of each decode
    decode_block_table: torch.Tensor | None    # [Bd, max_blocks] long, padded with block 0
    decode_context_len: torch.Tensor | None    # [Bd] long
    rope_spans: list[tuple[int, int, int, int]] = field(default_factory=list)   # start, end, prompt_len, seq_len
    memo: dict = field(default_factory=dict)   # per-pass masks, shared by all layers
    # The layer being computed: its new K/V rows [T, Hkv, D] (a fresh prompt attends to them directly).
    new_key: torch.Tensor | None = None
    new_value: torch.Tensor | None = None

    @classmethod
    def build(cls, chunks: Sequence[SeqChunk], cache: PagedKVCache,
              backend: "AttentionBackend") -> "AttentionContext":
        dev, bs = cache.device, cache.block_size
        query_start, slots, tables, prefill_ids, decode_ids = [0], [], [], [], []
        for i, c in enumerate(chunks):
            if c.num_tokens == 0:
                raise ValueError(f"pid {c.pid}: empty chunk")
            if len(c.block_ids) * bs < c.end_pos:
                raise ValueError(f"pid {c.pid}: {len(c.block_ids)} blocks cannot hold "
                                 f"{c.end_pos} tokens of {bs}")
            query_start.append(query_start[-1] + c.num_tokens)
            slots.extend(c.block_ids[p // bs] * bs + p % bs for p in range(c.start_pos, c.end_pos))
            (prefill_ids if c.num_tokens > 1 else decode_ids).append(i)
        bad = [b for c in chunks for b in c.block_ids if not 0 <= b < cache.num_blocks]
        if bad:
            raise ValueError(f"block ids out of range [0, {cache.num_blocks}): {bad[:8]}")
        tables = [torch.tensor(c.block_ids, dtype=torch.long, device=dev) for c in chunks]
        decode_rows = decode_table = decode_len = None
        if decode_ids:
            width = max(len(chunks[i].block_ids) for i in decode_ids)
            padded = [chunks[i].block_ids + [0] * (width - len(chunks[i].block_ids))
                      for i in decode_ids]
            decode_rows = torch.tensor([query_start[i] for i in decode_ids], device=dev)
            decode_table = torch.tensor(padded, dtype=torch.long, device=dev)
            decode_len = torch.tensor([chunks[i].end_pos for i in decode_ids], device=dev)
        return cls(cache=cache, backend=backend,
                   slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                   query_start=query_start, start_pos=[c.start_pos for c in chunks],
                   context_len=[c.end_pos for c in chunks], block_tables=tables,
                   prefill_ids=prefill_ids, decode_rows=decode_rows,
                   decode_block_table=decode_table, decode_context_len=decode_len,
                   rope_spans=[(c.start_pos, c.end_pos, c.prompt_len, max(c.seq_len, c.end_pos)) for c in chunks])


_current: contextvars.ContextVar[AttentionContext | Probe | None] = contextvars.ContextVar(
    "llmos_attention_context", default=None)


@contextlib.contextmanager
def use_context(ctx: AttentionContext | Probe) -> Iterator[AttentionContext | Probe]:
    """Make ``ctx`` the layout seen by every paged attention call inside the block (a
    ``Probe`` records the calls instead)."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def rope_spans() -> list[tuple[int, int, int, int]] | None:
    """The current pass's (start, end, prompt_len, seq_len) per sequence; None outside a paged pass."""
    ctx = _current.get()
    return ctx.rope_spans if isinstance(ctx, AttentionContext) else None


def allowed_positions(query_pos: torch.Tensor, kv_len: int,
                      sliding_window: int | None) -> torch.Tensor:
    """Bool mask [len(query_pos), kv_len]: a query at position q sees key positions p with
    p <= q and, under a sliding window W, p > q - W (transformers' convention)."""
    kv_pos = torch.arange(kv_len, device=query_pos.device)
    mask = kv_pos[None, :] <= query_pos[:, None]
    if sliding_window is not None:
        mask &= kv_pos[None, :] > query_pos[:, None] - sliding_window
    return mask


class AttentionBackend:
    """The seam for attention kernels. ``write`` stores a layer's new K/V at the context's
    slots; ``attend`` returns the attention output [T, H, Dv] for the flat query [T, H, Dk],
    each sequence attending causally to its own cached KV (which includes this pass's)."""
    name = "base"

    def write(self, ctx: AttentionContext, layer_idx: int, key: torch.Tensor,
              value: torch.Tensor) -> None:
        ctx.cache.write(layer_idx, ctx.slot_mapping, key, value)

    def attend(self, ctx: AttentionContext, layer_idx: int, query: torch.Tensor,
               scaling: float | None, sliding_window: int | None, softcap: float | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        """``softcap``: scores become ``softcap * tanh(score / softcap)`` before the softmax
        (Gemma 2); ``sinks`` [H]: one extra logit per head in the softmax's denominator, whose
        value is dropped (GPT-OSS attention sinks)."""
        raise NotImplementedError


class TorchBackend(AttentionBackend):
    """Reference backend in plain torch (any device): prefills one sequence at a time with
    ``scaled_dot_product_attention`` over its gathered blocks; all decodes in one call."""
    name = "torch"

    def attend(self, ctx, layer_idx, query, scaling, sliding_window, softcap=None, sinks=None):
        k_cache, v_cache = ctx.cache.layer(layer_idx)           # [N, bs, Hkv, Dk], [N, bs, Hkv, Dv]
        out = query.new_empty(*query.shape[:2], v_cache.shape[-1])
        for i in ctx.prefill_ids:
            q0, q1, kv_len = ctx.query_start[i], ctx.query_start[i + 1], ctx.context_len[i]
            q = query[q0:q1].unsqueeze(0)
            if ctx.start_pos[i] == 0 and (sliding_window is None or sliding_window >= kv_len):
                # A fresh prompt: its K/V are exactly this step's new rows; plain causal attention.
                out[q0:q1] = self._sdpa(q, ctx.new_key[q0:q1].unsqueeze(0), ctx.new_value[q0:q1].unsqueeze(0),
                                        None, scaling, softcap, sinks)[0]
                continue
            table = ctx.block_tables[i]
            key = k_cache.index_select(0, table).flatten(0, 1)[:kv_len]     # [L, Hkv, D]
            value = v_cache.index_select(0, table).flatten(0, 1)[:kv_len]
            memo_key = ("prefill", i, sliding_window)
            if memo_key not in ctx.memo:
                pos = torch.arange(ctx.start_pos[i], kv_len, device=query.device)
                ctx.memo[memo_key] = allowed_positions(pos, kv_len, sliding_window)
            out[q0:q1] = self._sdpa(q, key.unsqueeze(0), value.unsqueeze(0), ctx.memo[memo_key], scaling,
                                    softcap, sinks)[0]
        if ctx.decode_rows is not None:
            table = ctx.decode_block_table                      # [Bd, max_blocks]
            rows = (table.shape[0], -1, k_cache.shape[2])           # [Bd, max_blocks*bs, Hkv, D]
            key = k_cache.index_select(0, table.flatten()).view(*rows, k_cache.shape[3])
            value = v_cache.index_select(0, table.flatten()).view(*rows, v_cache.shape[3])
            memo_key = ("decode", sliding_window)
            if memo_key not in ctx.memo:
                last = ctx.decode_context_len - 1                   # query position per row
                kv_pos = torch.arange(key.shape[1], device=query.device)[None, :]
                mask = kv_pos <= last[:, None]
                if sliding_window is not None:
                    mask &= kv_pos > last[:, None] - sliding_window
                ctx.memo[memo_key] = mask[:, None, :]               # [Bd, 1, S]
            q = query[ctx.decode_rows].unsqueeze(1)                 # [Bd, 1, H, D]
            out[ctx.decode_rows] = self._sdpa(q, key, value, ctx.memo[memo_key], scaling, softcap, sinks)[:, 0]
        return out

    @staticmethod
    def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scaling: float | None, softcap: float | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, n, H, Dk], k [B, L, Hkv, Dk], v [B, L, Hkv, Dv], mask [n, L] or [B, n, L]
        (None: causal, n == L) -> [B, n, H, Dv]. With a soft-cap or sinks, the scores are computed explicitly (in
        float32, as transformers' eager attention does)."""
        if softcap or sinks is not None:
            return _explicit_attention(q, k, v, mask, scaling, softcap, sinks)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask.unsqueeze(-3), is_causal=mask is None,
            scale=scaling, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)


def _explicit_attention(q, k, v, mask, scaling, softcap, sinks) -> torch.Tensor:
    b, n, h, d = q.shape
    group = h // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bnhd,blhd->bhnl", q.float(), k.float()) * (scaling if scaling is not None else d ** -0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(n, k.shape[1], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))     # mask [.., n, L] -> [.., 1, n, L]
    if sinks is not None:
        sink = sinks.float().view(1, h, 1, 1).expand(b, h, n, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhnl,blhd->bnhd", probs, v.float()).to(q.dtype)


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0,
                            sliding_window: int | None = None, **kwargs):
    """transformers' attention-function signature: query [1, H, T, D], key/value
    [1, Hkv, T, D] for the packed batch; returns ([1, T, H, D], None)."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("paged attention called outside use_context(): the model driver "
                           "must run the forward pass")
    if query.shape[0] != 1:
        raise ValueError(f"paged attention expects one packed row, got batch {query.shape[0]}")
    if isinstance(ctx, Probe):
        return ctx.record(module, key, value, query), None
    layer_idx = getattr(module, KV_LAYER)
    ctx.new_key, ctx.new_value = key[0].transpose(0, 1), value[0].transpose(0, 1)   # [T, Hkv, D]
    ctx.backend.write(ctx, layer_idx, ctx.new_key, ctx.new_value)
    out = ctx.backend.attend(ctx, layer_idx, query[0].transpose(0, 1), scaling, sliding_window,
                             softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))
    return out.unsqueeze(0), None


def no_mask(*args, **kwargs) -> None:
    """Mask function for our implementation: the causal structure lives in the context, so
    transformers must never materialise a [T, T] mask."""
    return None


def register() -> str:
    """Register the paged attention function and its (empty) mask under one name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, no_mask)
    return ATTN_IMPLEMENTATION
