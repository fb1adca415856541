"""The paged KV cache: device blocks, host swap blocks, and the copies between them.

Block ids are the kernel's: the memory manager decides which process owns which block, this
module only stores bytes. Device K and V are each one tensor
``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]`` (V's last dim is ``v_head_dim``
when given: DeepSeek's MLA has smaller values than keys); the host swap pool has the
same layout with ``num_host_blocks`` blocks (pinned memory on CUDA so swaps can overlap).
"""
from __future__ import annotations

from typing import Sequence

import torch

from llmos.drivers.device import Device


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, num_host_blocks: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: Device,
                 v_head_dim: int | None = None):
        if num_blocks <= 0 or block_size <= 0 or num_host_blocks < 0:
            raise ValueError("need num_blocks > 0, block_size > 0, num_host_blocks >= 0")
        self.num_layers, self.num_blocks, self.num_host_blocks = num_layers, num_blocks, num_host_blocks
        self.block_size, self.dtype, self.device = block_size, dtype, device.torch_device
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        host_shape = (num_layers, num_host_blocks, block_size, num_kv_heads, head_dim)
        v_dim = head_dim if v_head_dim is None else v_head_dim
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros((*shape[:-1], v_dim), dtype=dtype, device=self.device)
        self.host_k = device.empty_host(host_shape, dtype)
        self.host_v = device.empty_host((*host_shape[:-1], v_dim), dtype)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Device bytes of one block across all layers, K and V."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each [num_blocks, block_size, num_kv_heads, head_dim] (V:
        v_head_dim)."""
        return self.k[layer_idx], self.v[layer_idx]

    def write(self, layer_idx: int, slot_mapping: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> None:
        """Store ``key``/``value`` [T, Hkv, D] at flat slots ``slot_mapping`` [T] of a layer."""
        k, v = self.layer(layer_idx)
        k.view(-1, *k.shape[2:]).index_copy_(0, slot_mapping, key.to(self.dtype))
        v.view(-1, *v.shape[2:]).index_copy_(0, slot_mapping, value.to(self.dtype))

    def _ids(self, pairs: Sequence[tuple[int, int]], limits: tuple[int, int], what: str):
        src = [a for a, _ in pairs]
        dst = [b for _, b in pairs]
        for ids, limit, side in ((src, limits[0], "source"), (dst, limits[1], "target")):
            bad = [i for i in ids if not 0 <= i < limit]
            if bad:
                raise ValueError(f"{what}: {side} block ids out of range [0, {limit}): {bad[:8]}")
        if len(set(dst)) != len(dst):
            raise ValueError(f"{what}: a target block appears twice")
        return src, dst

    def swap_out(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy device blocks to host blocks: ``pairs`` of (device_block, host_block)."""
        if not pairs:
            return
        dev, host = self._ids(pairs, (self.num_blocks, self.num_host_blocks), "swap_out")
        d = torch.tensor(dev, device=self.device)
        h = torch.tensor(host)
        self.host_k[:, h] = self.k[:, d].cpu()
        self.host_v[:, h] = self.v[:, d].cpu()

    def swap_in(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy host blocks to device blocks: ``pairs`` of (host_block, device_block)."""
        if not pairs:
            return
        host, dev = self._ids(pairs, (self.num_host_blocks, self.num_blocks), "swap_in")
        d = torch.tensor(dev, device=self.device)
        h = torch.tensor(host)
        # The gathered rows are staged in pinned memory (on CUDA) so the upload is async.
        for src, dst in ((self.host_k, self.k), (self.host_v, self.v)):
            staged = src[:, h]
            if self.device.type == "cuda":
                staged = staged.pin_memory()
            dst[:, d] = staged.to(self.device, non_blocking=True)

    def copy(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy device blocks to device blocks (fork's copy-on-write): (src, dst) pairs.
        All sources are read before any target is written."""
        if not pairs:
            return
        src, dst = self._ids(pairs, (self.num_blocks, self.num_blocks), "copy")
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        self.k[:, d] = self.k[:, s]
        self.v[:, d] = self.v[:, s]
