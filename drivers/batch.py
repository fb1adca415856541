"""The contract between the scheduler and the model driver.

The scheduler (``llmos.kernel.scheduler``) decides; the driver (``llmos.drivers.model``)
executes. A ``StepPlan`` says which token chunks run in this forward pass, where their KV
lives (device block ids), and which KV blocks move (swap out / swap in / copy-on-write
copies). A ``StepResult`` says what was sampled. Both are plain values: ids, counts and
token lists, never live kernel objects. The driver never reads scheduler state.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-process sampling. ``temperature == 0`` means greedy (argmax).

    Sampling is stateless: the draw for the token at sequence index ``i`` uses a generator
    seeded from ``(seed, i)``. Same seed -> same output, also after preemption and
    recompute; a forked child with another seed diverges.
    """
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                 # 0 = no top-k cut
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (0.0 <= self.temperature <= 100.0):
            raise ValueError("temperature must be in [0, 100]")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not (0.0 < self.repetition_penalty <= 10.0):
            raise ValueError("repetition_penalty must be in (0, 10]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SeqChunk:
    """One process's slice of a forward pass.

    ``token_ids`` are fed at positions ``start_pos .. start_pos+len(token_ids)-1``; the KV of
    positions ``< start_pos`` is already in the cache blocks ``block_ids`` (the process's whole
    block table, in order, covering at least ``start_pos + len(token_ids)`` tokens). The driver
    writes the new tokens' K/V into those blocks (slot = block_ids[p // block_size] *
    block_size + p % block_size). If ``sample`` is set, the logits of the last token are
    sampled and the result is the token at sequence index ``start_pos + len(token_ids)``.
    """
    pid: int
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Tokens seen so far (prompt + output), only needed when repetition_penalty != 1.
    history: list[int] | None = None
    # LoRA adapter (a name the driver has loaded with load_adapter), None for the base model.
    # Chunks with different adapters (and none) share one forward pass.
    adapter: str | None = None
    # Length facts some rope types choose frequencies by (``llmos.drivers.rope``): the length
    # of the process's first prompt, and how many tokens it holds (0: ``end_pos``).
    prompt_len: int = 0
    seq_len: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class StepPlan:
    """One scheduler decision. The driver applies, in this order: ``swap_out`` (device ->
    host copies), ``swap_in`` (host -> device), ``copies`` (device -> device, for fork's
    copy-on-write of a partial block), then the forward pass over ``chunks``.

    ``preempted`` lists (pid, "swap" | "recompute") for processes losing their device KV in
    this step: the kernel tells them before the driver runs the plan.
    """
    step_id: int
    chunks: list[SeqChunk] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)   # (device_block, host_block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)    # (host_block, device_block)
    copies: list[tuple[int, int]] = field(default_factory=list)     # (src_device_block, dst_device_block)
    preempted: list[tuple[int, str]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not (self.chunks or self.swap_out or self.swap_in or self.copies)


@dataclass(frozen=True)
class StepResult:
    """What the driver did: the token sampled for every chunk with ``sample=True``."""
    step_id: int
    sampled: dict[int, int] = field(default_factory=dict)   # pid -> token id
    num_tokens: int = 0                                      # tokens run through the model
