"""Choosing the next token from last-token logits.

Processing follows transformers' ``generate`` order: repetition penalty, then temperature,
top-k, top-p. Greedy rows (temperature 0) are the argmax of the (penalised) logits. Random
rows are stateless: the draw for the token at sequence index ``i`` uses a generator seeded
from ``mix_seed(seed, i)``, so a process recomputed after preemption draws the same tokens,
and two processes with different seeds diverge.
"""
from __future__ import annotations

from typing import Sequence

import torch

from llmos.drivers.batch import SamplingParams

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed from (seed, index): splitmix64 of both, so nearby pairs give
    unrelated streams."""
    def splitmix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)
    return splitmix(splitmix(seed & _MASK64) ^ (index & _MASK64)) >> 1


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int],
                             penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on one row [V]: for tokens in
    ``history``, positive logits are divided by ``penalty`` and negative ones multiplied."""
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
    seen = logits.gather(0, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(0, ids, seen)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th are kept); -inf the rest."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter with transformers' semantics: drop the tokens whose ascending
    cumulative probability is <= 1 - p, always keeping the most likely token."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_row(logits: torch.Tensor, params: SamplingParams, index: int,
               history: Sequence[int] | None = None) -> int:
    """The token for one sequence: ``logits`` [V] (fp32) predict sequence index ``index``."""
    logits = apply_repetition_penalty(logits, history or (), params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(dim=-1)
    gen = torch.Generator(device=logits.device).manual_seed(mix_seed(params.seed, index))
    return int(torch.multinomial(probs, 1, generator=gen))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], indices: Sequence[int],
           histories: Sequence[Sequence[int] | None]) -> list[int]:
    """One token per row of ``logits`` [N, V]. Plain greedy rows (no penalty) share one
    batched argmax; the others are sampled row by row with their own seeded generator."""
    logits = logits.float()
    tokens: list[int | None] = [None] * len(params)
    plain = [i for i, p in enumerate(params) if p.greedy and p.repetition_penalty == 1.0]
    if plain:
        for i, t in zip(plain, logits[plain].argmax(dim=-1).tolist()):
            tokens[i] = t
    for i, p in enumerate(params):
        if tokens[i] is None:
            tokens[i] = sample_row(logits[i], p, indices[i], histories[i])
    return tokens  # type: ignore[return-value]
