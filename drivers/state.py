"""Recurrent state (Mamba, linear attention, short convolutions) kept in the process's own KV blocks.

Hybrid models (Qwen3-Next, LFM2, Falcon-H1, Bamba, Granite-4 hybrid, Nemotron-H, ...) keep, per
sequence, a fixed-size state in some layers besides the KV of their attention layers. The kernel
gives such a process ``state_blocks`` extra blocks at the front of its block table; this module
stores the state's bytes in those blocks' memory of the KV pool. So the kernel's memory manager
does everything to the state it does to KV: allocated with the first block, freed at exit,
swapped to host and back, dropped and recomputed, and on ``fork`` copied block by block — a
state cannot be shared copy-on-write like a full KV block, since every step rewrites it; a fork
costs one copy of ``state_bytes``. No prefix cache: the state at a cached prefix is not kept.

The model's own recurrent code runs unchanged through transformers' cache API: each sequence
gets a ``DynamicCache`` whose attention layers pass their new K/V straight to the paged
attention, and whose linear-attention layers are loaded from the blocks before the forward pass
and saved back after it. Sequences run one forward pass each (a recurrent layer scans one
sequence at a time); a sequence's first chunk starts from a zero state. A model whose code keeps
its state in a cache class of its own (MiniMax's ``linear_cache``) gets that class.

A model with no attention layers at all (Mamba, Mamba-2, FalconMamba) keeps nothing per token:
its pool's blocks are sized to hold one state each (``state_only_layout``) and a process holds
just that one block.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionCacheLayerMixin, get_layer_types_and_kwargs

from llmos.drivers.probe import KVLayout

# transformers' cache layer types that keep recurrent state
RECURRENT = ("conv", "linear_attention", "hybrid", "hybrid_sliding")


def recurrent_layer_types(text_config) -> list[str]:
    try:
        return sorted(set(get_layer_types_and_kwargs(text_config)[0]) & set(RECURRENT))
    except Exception:                   # a config transformers' cache cannot describe: the gate decides
        return []


@dataclass(frozen=True)
class Entry:
    """One state tensor: layer, state index, "conv", "recurrent" or "linear" (a model's own
    cache), shape (batch 1), dtype."""
    layer: int
    index: int
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def _passthrough(key, value, *args, **kwargs):
    return key, value                   # the paged attention stores and reads KV, not this cache


def _own_cache_class(model) -> type | None:
    """The cache class a model's module defines for itself (MiniMax's), if any."""
    module = sys.modules.get(type(model).__module__)
    own = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, DynamicCache)
           and v.__module__ == module.__name__] if module else []
    return own[0] if len(own) == 1 else None


def new_cache(model) -> DynamicCache:
    """A per-sequence cache: recurrent layers keep state, attention layers keep nothing."""
    own = _own_cache_class(model)
    if own is not None:
        cache = own()
        cache.update = _passthrough     # its layers are made as attention calls update: none are
        return cache
    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        layer.update = _passthrough
    return cache


def state_only_layout(num_bytes: int, block_size: int, dtype: torch.dtype) -> KVLayout:
    """A one-layer, one-head pool whose blocks (K and V together) hold ``num_bytes`` each."""
    elem = torch.empty((), dtype=dtype).element_size()
    width = max(1, -(-num_bytes // (2 * block_size * elem)))
    return KVLayout(1, 1, width, width)


def _tensors(cache: DynamicCache):
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for j in range(layer.number_of_states):
                if layer.is_conv_states_initialized[j]:
                    yield i, j, "conv", layer.conv_states[j]
                if layer.is_recurrent_states_initialized[j]:
                    yield i, j, "recurrent", layer.recurrent_states[j]
    for i, t in enumerate(getattr(cache, "linear_cache", ())):
        if isinstance(t, torch.Tensor):
            yield i, 0, "linear", t


class RecurrentState:
    """The state layout of one model (from a probing forward pass) and its bytes in KV blocks."""

    def __init__(self, model, probed: DynamicCache):
        self.model = model
        self.entries = [Entry(i, j, kind, tuple(t.shape), t.dtype) for i, j, kind, t in _tensors(probed)]
        if not self.entries:
            raise ValueError("its recurrent layers left no state in transformers' cache")
        self.num_bytes = sum(e.num_bytes for e in self.entries)

    def blocks(self, bytes_per_block: int) -> int:
        return -(-self.num_bytes // bytes_per_block)

    def load(self, kv, block_ids: list[int]) -> DynamicCache:
        """A cache holding the state stored in ``block_ids`` (the sequence has computed tokens)."""
        cache = new_cache(self.model)
        raw, offset = self._read(kv, block_ids), 0
        for e in self.entries:
            t = raw[offset:offset + e.num_bytes].view(e.dtype).view(e.shape).clone()
            offset += e.num_bytes
            if e.kind == "linear":
                cache.set_linear_cache(e.layer, t)
                continue
            layer = cache.layers[e.layer]
            if e.kind == "conv":
                layer.conv_states[e.index], layer.conv_kernel_size[e.index] = t, e.shape[-1]
                layer.is_conv_states_initialized[e.index] = True
                layer.dtype, layer.device = t.dtype, t.device
            else:
                layer.recurrent_states[e.index] = t
                layer.is_recurrent_states_initialized[e.index] = True
            layer.has_previous_state[e.index] = True
        return cache

    def save(self, kv, block_ids: list[int], cache: DynamicCache) -> None:
        found = {(i, j, kind): t for i, j, kind, t in _tensors(cache)}
        parts = []
        for e in self.entries:
            t = found.get((e.layer, e.index, e.kind))
            if t is None or tuple(t.shape) != e.shape or t.dtype != e.dtype:
                raise RuntimeError(f"recurrent state of layer {e.layer} changed its layout")
            parts.append(t.contiguous().view(-1).view(torch.uint8))
        self._write(kv, block_ids, torch.cat(parts))

    @staticmethod
    def _read(kv, block_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(block_ids, device=kv.k.device)
        return torch.cat([kv.k[:, ids].reshape(-1).view(torch.uint8), kv.v[:, ids].reshape(-1).view(torch.uint8)])

    @staticmethod
    def _write(kv, block_ids: list[int], raw: torch.Tensor) -> None:
        ids = torch.tensor(block_ids, device=kv.k.device)
        k_shape, v_shape = kv.k[:, ids].shape, kv.v[:, ids].shape
        k_bytes = k_shape.numel() * kv.k.element_size()
        full = torch.zeros(k_bytes + v_shape.numel() * kv.v.element_size(), dtype=torch.uint8, device=raw.device)
        full[:raw.numel()] = raw
        kv.k[:, ids] = full[:k_bytes].view(kv.k.dtype).view(k_shape)
        kv.v[:, ids] = full[k_bytes:].view(kv.v.dtype).view(v_shape)
