"""Rotary frequencies that depend on a sequence's length, chosen per sequence, never per batch.

transformers picks two rope types' frequencies from ``max(position_ids) + 1`` of the forward
pass: **longrope** (Phi-3/3.5 128k, Phi-4-mini) uses its long factors once a sequence is longer
than ``original_max_position_embeddings`` — and Phi-3's ``generate`` recomputes the whole cache
with them at that crossing — and **dynamic** NTK rescales its base for each length past
``max_position_embeddings``. In a packed batch the largest position of *another* sequence
would decide; so the driver replaces the forward of such rotary modules with one that groups
the batch's tokens by the length transformers would have seen for them, and runs the model's
own rotary code once per group:

- longrope: every token of a sequence with ``seq_len`` tokens uses the long factors iff
  ``seq_len > original`` (its whole KV, as after Phi-3's recompute);
- dynamic: the token at position ``p`` uses ``max(p + 1, prompt_len)`` — its prompt was one
  forward pass in ``generate``, each later token one more step.

``variant(prompt_len, seq_len)`` names which of these KV a sequence holds: when it changes (a
longrope sequence crosses the threshold) the kernel recomputes the sequence's KV, and the
prefix cache never shares KV across variants. Other rope types (linear, YaRN, llama3) are a
function of position alone and pass through untouched.
"""
from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

LENGTH_DEPENDENT = ("longrope", "dynamic")


class _Module:
    """One rotary module of a length-dependent type and its thresholds."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.kind = module, module.rope_type
        self.forward = type(module).forward.__wrapped__          # the model's rope, without transformers' update
        params = module.config.rope_parameters
        self.original = int(params.get("original_max_position_embeddings")
                            or module.config.max_position_embeddings)
        self.limit = int(module.config.max_position_embeddings)  # dynamic rescales past this
        self.freqs: dict[int, tuple[torch.Tensor, float]] = {}

    def key(self, pos: int, prompt_len: int, seq_len: int) -> int:
        """0: the frequencies of short sequences; else the length transformers would use."""
        if self.kind == "longrope":
            return 1 if seq_len > self.original else 0           # one long set for every longer length
        length = max(pos + 1, prompt_len)
        return length if length > self.limit else 0

    def inv_freq(self, key: int, device) -> tuple[torch.Tensor, float]:
        m = self.module
        if key == 0:
            return m.original_inv_freq.to(device), m.attention_scaling
        if self.kind == "longrope":
            key = self.original + 1                              # the length transformers computes them for
        if key not in self.freqs:
            inv, scale = ROPE_INIT_FUNCTIONS[self.kind](m.config, device, seq_len=key)
            self.freqs[key] = inv.to(device), (m.attention_scaling if self.kind == "longrope" else scale)
        return self.freqs[key]


def context_len(text_config) -> int:
    """The longest sequence a model serves: ``max_position_embeddings``, or for dynamic NTK, made
    for lengths past it, ``factor`` times that."""
    length = int(getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
                 or 2048)
    params = getattr(text_config, "rope_parameters", None) or {}
    return int(length * float(params.get("factor", 1.0))) if params.get("rope_type") == "dynamic" else length


def length_dependent_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "rope_type", None), str)
            and m.rope_type in LENGTH_DEPENDENT and hasattr(m, "original_inv_freq")
            and hasattr(type(m).forward, "__wrapped__")]


class SequenceRope:
    """Installs per-sequence frequencies on ``model``'s length-dependent rotary modules; the
    current batch layout comes from ``layout()`` (None: the model's own behaviour)."""

    def __init__(self, model: torch.nn.Module, layout):
        per_layer = [m for m in model.modules() if isinstance(getattr(m, "rope_type", None), dict)
                     and set(m.rope_type.values()) & set(LENGTH_DEPENDENT)]
        if per_layer:
            raise ValueError("length-dependent rope per layer type is not supported")
        self.modules = [_Module(m) for m in length_dependent_modules(model)]
        self._layout = layout
        for entry in self.modules:
            entry.module.forward = self._forward_of(entry)

    def variant(self, prompt_len: int, seq_len: int) -> int:
        """Which KV a sequence of ``seq_len`` tokens (``prompt_len`` of them its prompt) holds."""
        return hash(tuple(e.key(0, prompt_len, seq_len) for e in self.modules)) if self.modules else 0

    def _forward_of(self, entry: _Module):
        def forward(x, position_ids, *args, **kwargs):
            spans = self._layout()
            m = entry.module
            if spans is None:                                    # probing, or the model's own forward
                return type(m).forward(m, x, position_ids, *args, **kwargs)
            keys = [entry.key(p, prompt_len, seq_len) for start, end, prompt_len, seq_len in spans
                    for p in range(start, end)]
            cos = sin = None
            saved = m.inv_freq, m.attention_scaling
            try:
                for key in sorted(set(keys)):
                    rows = torch.tensor([i for i, k in enumerate(keys) if k == key], device=position_ids.device)
                    m.inv_freq, m.attention_scaling = entry.inv_freq(key, position_ids.device)
                    c, s = entry.forward(m, x, position_ids[:, rows], *args, **kwargs)
                    if cos is None:
                        cos = c.new_empty(c.shape[0], len(keys), *c.shape[2:])
                        sin = torch.empty_like(cos)
                    cos[:, rows], sin[:, rows] = c, s
            finally:
                m.inv_freq, m.attention_scaling = saved
            return cos, sin
        return forward
