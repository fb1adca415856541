"""Shared factories for the model-driver tests: tiny random models, HF reference generation,
and a toy scheduler that drives ``ModelDriver`` with hand-made StepPlans.

Import the fixtures into a test module with ``from fixtures_models import tiny_models``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from llmos.drivers.batch import SamplingParams, SeqChunk, StepPlan, StepResult
from llmos.drivers.default_model import ARCHITECTURES, make_tiny_model
from llmos.drivers.model import ModelDriver

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

BLOCK_SIZE = 4          # small blocks: short prompts still span several blocks
NUM_BLOCKS = 96
NUM_HOST_BLOCKS = 16


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """arch -> directory of a tiny random model, built once per test session."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


def load_driver(path: str, block_size: int = BLOCK_SIZE, backend=None) -> ModelDriver:
    driver = ModelDriver(path, device="cpu", dtype="float32", block_size=block_size,
                         backend=backend)
    driver.allocate_kv(NUM_BLOCKS, NUM_HOST_BLOCKS)
    return driver


@lru_cache(maxsize=None)
def hf_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: str, prompt: list[int], num_new: int) -> list[int]:
    """transformers' own greedy continuation (default attention), exactly ``num_new`` tokens:
    no EOS, so nothing stops early and no logits processor touches the scores. Each call starts
    as a freshly loaded model would: transformers' dynamic NTK rope keeps the frequencies of the
    longest sequence it has seen from one ``generate`` call to the next."""
    model = hf_model(path)
    for m in model.modules():
        if hasattr(m, "max_seq_len_cached") and hasattr(m, "original_inv_freq"):
            m.inv_freq, m.max_seq_len_cached = m.original_inv_freq.clone(), m.original_max_seq_len
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompt_of(length: int, offset: int = 0) -> list[int]:
    """A deterministic prompt of ordinary (non-special) token ids."""
    return [10 + (offset + 7 * i) % 500 for i in range(length)]


@dataclass
class Seq:
    pid: int
    tokens: list[int]                   # prompt + generated so far
    prompt_len: int
    max_new: int
    block_ids: list[int]
    chunk: int | None = None            # prefill chunk size; None = whole prompt at once
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_computed: int = 0               # tokens whose KV is in the cache

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new


class ToyScheduler:
    """Just enough scheduler to drive the driver: consecutive block ids per sequence, chunked
    prefill, every live sequence in every step."""

    def __init__(self, driver: ModelDriver):
        self.driver = driver
        self.seqs: dict[int, Seq] = {}
        self.next_block = 0
        self.step_id = 0

    def alloc(self, num_tokens: int) -> list[int]:
        """Block ids for ``num_tokens`` tokens (after the model's recurrent-state blocks, if any)."""
        n = self.driver.blocks_for(num_tokens)
        ids = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        assert self.next_block <= NUM_BLOCKS
        return ids

    def add(self, pid: int, prompt: list[int], max_new: int, chunk: int | None = None,
            sampling: SamplingParams | None = None) -> Seq:
        seq = Seq(pid, list(prompt), len(prompt), max_new, self.alloc(len(prompt) + max_new),
                  chunk, sampling or SamplingParams())
        self.seqs[pid] = seq
        return seq

    def chunk_for(self, seq: Seq) -> SeqChunk:
        start = seq.num_computed
        if start < seq.prompt_len and seq.chunk:
            end = min(start + seq.chunk, seq.prompt_len)
        else:
            end = len(seq.tokens)
        return SeqChunk(seq.pid, seq.tokens[start:end], start, seq.block_ids,
                        sample=end == len(seq.tokens), sampling=seq.sampling,
                        history=list(seq.tokens[:end]), prompt_len=seq.prompt_len, seq_len=len(seq.tokens))

    def step(self, **moves) -> StepResult:
        live = [s for s in self.seqs.values() if not s.done]
        chunks = [self.chunk_for(s) for s in live]
        result = self.driver.execute(StepPlan(self.step_id, chunks, **moves))
        self.step_id += 1
        assert result.num_tokens == sum(c.num_tokens for c in chunks)
        for seq, c in zip(live, chunks):
            seq.num_computed = c.end_pos
            if c.sample:
                variant = self.driver.rope.variant(seq.prompt_len, len(seq.tokens))
                seq.tokens.append(result.sampled[seq.pid])
                if self.driver.rope.variant(seq.prompt_len, len(seq.tokens)) != variant:
                    seq.num_computed = 0        # its KV is of another rope variant now: recompute it
            else:
                assert seq.pid not in result.sampled
        return result

    def run(self) -> None:
        while any(not s.done for s in self.seqs.values()):
            self.step()
