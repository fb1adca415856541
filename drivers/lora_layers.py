"""Batched multi-LoRA layers: many adapters in one forward pass (the S-LoRA / Punica idea).

Every base linear that some loaded adapter targets is replaced by a ``BatchedLoRALinear``.
It holds, per device slot ``s``, the slot's adapter weights stacked and rank-padded:
``A [S, R, in]``, ``B [S, out, R]``, ``scales [S]`` (zero rows/columns beyond an adapter's own
rank, so padding adds exact zeros). Which slot each token of the packed batch uses is not in
the module's arguments but in a ``LoRABatch`` installed around the forward pass with
``use_batch`` (a ContextVar, like the attention context: every architecture passes it through
unchanged). Without a batch, or when no token uses a slot this module serves, the wrapper
returns exactly ``base(x)``.

``lora_delta`` is the seam: the per-slot math in one function, so a gather-and-multiply GPU
kernel (Punica's BGMV/SGMV) can replace it without touching anything else.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class LoRABatch:
    """Which adapter slot every one of the ``T`` packed tokens uses in this pass.

    ``slot_ids [T]`` (long, on the device; -1 = base model only) is what a kernel needs.
    ``groups`` lists, for each slot in use, the flat-batch rows it owns (a long tensor on the
    device, or None for all ``T`` rows); it is built on the host from the plan, so the torch
    path never synchronises with the device to find them.
    """
    slot_ids: torch.Tensor
    groups: tuple[tuple[int, torch.Tensor | None], ...]

    @classmethod
    def build(cls, spans: Sequence[tuple[int, int]], device: torch.device) -> "LoRABatch | None":
        """``spans``: (slot or -1, num_tokens) per chunk, in batch order. None if no token
        uses a slot."""
        num_tokens = sum(n for _, n in spans)
        rows: dict[int, list[int]] = {}
        start = 0
        for slot, n in spans:
            if slot >= 0:
                rows.setdefault(slot, []).extend(range(start, start + n))
            start += n
        if not rows:
            return None
        slot_ids = torch.tensor([s for s, n in spans for _ in range(n)], dtype=torch.long,
                                device=device)
        groups = tuple((s, None if len(r) == num_tokens else
                        torch.tensor(r, dtype=torch.long, device=device))
                       for s, r in rows.items())
        return cls(slot_ids, groups)


_current: contextvars.ContextVar[LoRABatch | None] = contextvars.ContextVar(
    "llmos_lora_batch", default=None)


@contextlib.contextmanager
def use_batch(batch: LoRABatch | None) -> Iterator[LoRABatch | None]:
    """Make ``batch`` the slot layout seen by every ``BatchedLoRALinear`` inside the block
    (None: every wrapper is the plain base layer)."""
    token = _current.set(batch)
    try:
        yield batch
    finally:
        _current.reset(token)


def lora_delta(x: torch.Tensor, slot_ids: torch.Tensor, A_stack: torch.Tensor,
               B_stack: torch.Tensor, scales: torch.Tensor,
               groups: Sequence[tuple[int, torch.Tensor | None]] | None = None) -> torch.Tensor:
    """The LoRA term for a packed batch: row ``t`` gets
    ``scales[s] * (x[t] @ A_stack[s].T) @ B_stack[s].T`` with ``s = slot_ids[t]``, and zero
    where ``s == -1``.

    x [T, in]; slot_ids [T] long; A_stack [S, R, in]; B_stack [S, out, R]; scales [S]
    -> delta [T, out] in x's dtype. ``groups`` (slot, rows) are the slots to apply, with their
    rows (None = all); derived from ``slot_ids`` when not given (that costs a device sync).
    This torch version does one pair of small matmuls per slot in use (segment style); a
    fused kernel takes ``slot_ids`` directly.
    """
    if groups is None:
        groups = [(int(s), torch.nonzero(slot_ids == s).flatten())
                  for s in torch.unique(slot_ids).tolist() if s >= 0]
    if len(groups) == 1 and groups[0][1] is None:
        s = groups[0][0]
        return (x @ A_stack[s].T) @ B_stack[s].T * scales[s]
    delta = x.new_zeros(x.shape[0], B_stack.shape[1])
    for s, rows in groups:
        xs = x if rows is None else x.index_select(0, rows)
        part = (xs @ A_stack[s].T) @ B_stack[s].T * scales[s]
        if rows is None:
            delta += part
        else:
            delta.index_add_(0, rows, part)
    return delta


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored
    transposed as [in, out]); ValueError for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise ValueError(f"LoRA needs nn.Linear or Conv1D, not {type(module).__name__}")


class BatchedLoRALinear(nn.Module):
    """``base(x) + lora_delta(x, ...)`` over ``num_slots`` device slots.

    Slots are filled and emptied by the adapter manager (``set_slot`` / ``clear_slot``); the
    stacks grow to the largest rank ever placed here and never shrink.
    """

    def __init__(self, base: nn.Module, num_slots: int):
        super().__init__()
        self.in_features, self.out_features = linear_features(base)
        self.base = base
        self.num_slots = num_slots
        weight = base.weight
        self.register_buffer("A_stack", weight.new_zeros(num_slots, 0, self.in_features),
                             persistent=False)
        self.register_buffer("B_stack", weight.new_zeros(num_slots, self.out_features, 0),
                             persistent=False)
        # float32 whatever the model dtype: a bf16 scale would round alpha/r (peft keeps a float).
        self.register_buffer("scales", weight.new_zeros(num_slots, dtype=torch.float32),
                             persistent=False)
        self.active_slots: set[int] = set()

    @property
    def rank(self) -> int:
        return self.A_stack.shape[1]

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Copy one adapter's A [r, in], B [out, r] (any device/dtype) into ``slot``."""
        r = A.shape[0]
        if r > self.rank:
            grown_A = self.A_stack.new_zeros(self.num_slots, r, self.in_features)
            grown_B = self.B_stack.new_zeros(self.num_slots, self.out_features, r)
            grown_A[:, :self.rank] = self.A_stack
            grown_B[:, :, :self.rank] = self.B_stack
            self.A_stack, self.B_stack = grown_A, grown_B
        self.A_stack[slot].zero_()
        self.B_stack[slot].zero_()
        self.A_stack[slot, :r].copy_(A)
        self.B_stack[slot, :, :r].copy_(B)
        self.scales[slot] = scale
        self.active_slots.add(slot)

    def clear_slot(self, slot: int) -> None:
        """This module no longer serves ``slot`` (its stale weights are never read)."""
        self.active_slots.discard(slot)
        self.scales[slot] = 0.0

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A_stack, self.B_stack, self.scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        batch = _current.get()
        if batch is None or not self.active_slots:
            return out
        groups = [(s, rows) for s, rows in batch.groups if s in self.active_slots]
        if not groups:
            return out
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] != batch.slot_ids.shape[0]:
            raise RuntimeError(f"LoRA layer got {flat.shape[0]} rows for a batch of "
                               f"{batch.slot_ids.shape[0]} tokens")
        delta = lora_delta(flat, batch.slot_ids, self.A_stack, self.B_stack, self.scales, groups)
        return out + delta.view_as(out)

    def extra_repr(self) -> str:
        return f"slots={self.num_slots}, rank={self.rank}, active={sorted(self.active_slots)}"
