"""The KV layout of a loaded model, read from its own attention calls rather than its config.

Configs name their sizes in many ways (``num_key_value_heads``, ``n_head``, ``head_dim``,
``qk_nope_head_dim + qk_rope_head_dim`` ...), MLA models cache keys and values of different
widths, and hybrid models attend in only some of their layers. So at load the driver runs one
token through the decoder with a probing context: every call that reaches the paged attention
function records its module and the shapes of its key and value, and gets zeros back. The
result says how many layers attend, in which order (each calling module is given its KV layer
``module.llmos_kv_layer``), and the K/V heads and widths the cache must hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

ATTRIBUTE = "llmos_kv_layer"


@dataclass
class Probe:
    """Installed in place of an ``AttentionContext`` while probing."""
    calls: list[tuple[torch.nn.Module, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def record(self, module, key: torch.Tensor, value: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """key/value [1, Hkv, T, D]; returns the zero output [1, T, H, Dv] the model expects."""
        self.calls.append((module, tuple(key.shape[1::2]), tuple(value.shape[1::2])))
        return query.new_zeros(1, query.shape[2], query.shape[1], value.shape[-1])


@dataclass(frozen=True)
class KVLayout:
    num_layers: int            # layers that attend (and own KV); hybrid models have fewer than their depth
    num_kv_heads: int
    k_head_dim: int
    v_head_dim: int


def kv_layout(name: str, probe: Probe) -> KVLayout:
    """Check the calls of one probing pass and number the attending modules in call order.
    ``ValueError`` when the paged KV cache cannot hold what the model attends to."""
    if not probe.calls:
        raise ValueError(f"{name}: no layer calls transformers' attention interface, so its attention "
                         f"cannot use the paged KV cache")
    modules = [m for m, _, _ in probe.calls]
    if len({id(m) for m in modules}) != len(modules):
        raise ValueError(f"{name}: one attention module runs more than once per forward pass "
                         f"(shared layers); the paged KV cache keeps one layer per module")
    shapes = {(k[0], k[1], v[1]) for _, k, v in probe.calls}
    if len(shapes) != 1 or any(k[0] != v[0] for _, k, v in probe.calls):
        raise ValueError(f"{name}: its attention layers keep KV of different shapes "
                         f"({sorted(shapes)}); the paged KV cache holds one shape for all layers")
    for i, module in enumerate(modules):
        setattr(module, ATTRIBUTE, i)
    (num_kv_heads, k_dim, v_dim), = shapes
    return KVLayout(len(modules), num_kv_heads, k_dim, v_dim)
