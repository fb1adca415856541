"""The coverage check: one architecture of the zoo through the model driver, against
transformers' own ``generate``.

``check(arch, root)`` builds the tiny checkpoint (``model_zoo.build``), loads it through
``ModelDriver`` (CPU, float32, 4-token blocks) and, unless the driver refuses it at load with
a ``ValueError``, compares greedy output token for token with ``generate`` in six ways:

- alone:   each prompt (5, 23, 41, 70 tokens, as the context allows) on its own;
- batched: all prompts in one run, joining at different steps (prefills beside decodes);
- chunked: the longest prompt prefilled 13 tokens a step while the shortest decodes;
- forked:  a sequence forked after a few decodes: the child shares the parent's full blocks,
           gets copies of the partial one and of any recurrent-state blocks (copy-on-write)
           and its own next input; both go on;
- swapped: a sequence's blocks swapped out to host memory after a few decodes and back into
           other device blocks, beside a sequence that keeps running;
- recomputed: a sequence's KV dropped after a few decodes and rebuilt by one prefill of its
           prompt and output so far (the kernel's recompute preemption).

The verdict is one ``Row``: EXACT, REFUSED (the reason), NOT_BUILT (the reason), or — the
bug the driver must never have — WRONG (where the first token differs) or FAILS (the error).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

import model_zoo
from fixtures_models import Seq, ToyScheduler, hf_greedy, hf_model, prompt_of
from llmos.drivers.model import ModelDriver

BLOCK_SIZE = 4
NUM_BLOCKS = 192             # the batched run takes 85 (and each sequence its state blocks)
NUM_HOST_BLOCKS = 32
PROMPT_LENGTHS = (5, 23, 41, 70)
NUM_NEW = 48
CHUNK = 13
MIN_DISTINCT = 4             # fewer distinct tokens in a continuation: equality proves little
FORK_AFTER = 6               # steps before a fork, swap or recompute: mid-block
FORK_INPUT = [17, 33, 65]    # what the child is given after the fork


class Verdict(enum.Enum):
    EXACT = "exact"
    REFUSED = "refused"
    NOT_BUILT = "not built"
    WRONG = "WRONG"
    FAILS = "FAILS"

    @property
    def ok(self) -> bool:
        """Exact, or refused/not built with a reason: what the sweep allows."""
        return self in (Verdict.EXACT, Verdict.REFUSED, Verdict.NOT_BUILT)


@dataclass
class Row:
    arch: str
    verdict: Verdict
    detail: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        text = self.verdict.value + (f": {self.detail}" if self.detail else "")
        return f"{self.arch}: {text}"


def check(arch: str, root) -> Row:
    """The verdict on ``arch``; its checkpoint is built under ``root`` (once)."""
    start = time.perf_counter()
    row = _check(arch, root)
    row.seconds = time.perf_counter() - start
    hf_model.cache_clear()
    return row


def _check(arch: str, root) -> Row:
    try:
        path = model_zoo.build(arch, root)
    except model_zoo.NotBuilt as exc:
        return Row(arch, Verdict.NOT_BUILT, str(exc))
    try:                                # what transformers itself cannot run is no test of the driver
        with torch.inference_mode():
            hf_model(path)(input_ids=torch.tensor([prompt_of(8)]))
    except Exception as exc:
        return Row(arch, Verdict.NOT_BUILT, f"transformers itself cannot run it: {_error(exc)}")
    try:
        driver = ModelDriver(path, device="cpu", dtype="float32", block_size=BLOCK_SIZE)
    except ValueError as exc:
        return Row(arch, Verdict.REFUSED, _one_line(exc))
    except Exception as exc:            # a load must refuse with a reason, not crash
        return Row(arch, Verdict.FAILS, f"at load: {_error(exc)}")
    k = driver.state_blocks                 # recurrent state: blocks at the front of every table
    driver.allocate_kv(NUM_BLOCKS + 16 * k, NUM_HOST_BLOCKS + k)
    lengths = [n for n in PROMPT_LENGTHS if n + NUM_NEW + len(FORK_INPUT) <= driver.max_model_len]
    if not lengths:
        return Row(arch, Verdict.NOT_BUILT, f"the driver's context of {driver.max_model_len} tokens is too short "
                                            f"to check")
    prompts = {n: prompt_of(n, offset=n) for n in lengths}
    try:
        expected = {n: hf_greedy(path, p, NUM_NEW) for n, p in prompts.items()}
    except Exception as exc:
        return Row(arch, Verdict.NOT_BUILT, f"transformers' own generate fails: {_error(exc)}")
    problems = []
    for name, scenario in SCENARIOS.items():
        try:
            problems += [f"{name}, {p}" for p in scenario(driver, path, prompts, expected)]
        except Exception as exc:
            problems.append(f"{name}: {_error(exc)}")
    failed = [p for p in problems if "differs" not in p]
    if failed:
        return Row(arch, Verdict.FAILS, "; ".join(failed[:2]))
    if problems:
        return Row(arch, Verdict.WRONG, "; ".join(problems[:3]))
    notes = []
    if len(lengths) < len(PROMPT_LENGTHS):
        notes.append(f"prompts of {', '.join(map(str, lengths))} tokens only: the driver's context is "
                     f"{driver.max_model_len}")
    if min(len(set(tokens)) for tokens in expected.values()) < MIN_DISTINCT:
        notes.append("a weak check: the random model's greedy output repeats a few tokens")
    return Row(arch, Verdict.EXACT, "; ".join(notes))


class Scheduler(ToyScheduler):
    """ToyScheduler over the driver's whole pool that, like the kernel's block manager, never
    rewrites a block another sequence shares: a sequence that must recompute its KV (its rope
    variant changed) gets fresh blocks if a fork shares its own."""

    def alloc(self, num_tokens: int) -> list[int]:
        n = self.driver.blocks_for(num_tokens)
        ids = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        assert self.next_block <= self.driver.kv.num_blocks, "the check's pool is too small"
        return ids

    def step(self, **moves):
        result = super().step(**moves)
        for seq in self.seqs.values():
            if seq.num_computed == 0 and not seq.done:
                shared = {b for other in self.seqs.values() if other is not seq for b in other.block_ids}
                if shared & set(seq.block_ids):
                    seq.block_ids = _blocks(self, len(seq.block_ids))
        return result


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_one_line(exc)}"[:240]


def _compare(what: str, got: list[int], want: list[int]) -> list[str]:
    """[] if equal, else where the first token differs."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return [f"{what}: token {i} of {len(want)} differs (got {a}, want {b})"]
    if len(got) != len(want):
        return [f"{what}: {len(got)} tokens, want {len(want)}"]
    return []


def alone(driver, path, prompts, expected) -> list[str]:
    problems = []
    for n, prompt in prompts.items():
        sched = Scheduler(driver)
        seq = sched.add(1, prompt, NUM_NEW)
        sched.run()
        wrong = _compare(f"prompt {n}", seq.output, expected[n])
        if wrong and seq.output == uncached_greedy(path, prompt, NUM_NEW):
            wrong = [f"{wrong[0]} (= transformers' own forward without a cache)"]
        problems += wrong
    return problems


@torch.inference_mode()
def uncached_greedy(path: str, prompt: list[int], num_new: int) -> list[int]:
    """Greedy continuation by the model's whole forward pass at every step, no KV cache: tells
    a driver bug from transformers' cache disagreeing with its own forward."""
    model, ids = hf_model(path), list(prompt)
    for _ in range(num_new):
        ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def batched(driver, path, prompts, expected) -> list[str]:
    """Two sequences start together; the others join after a few steps, beside decodes."""
    sched = Scheduler(driver)
    lengths = list(prompts)
    for i, n in enumerate(lengths):
        sched.add(n, prompts[n], NUM_NEW)
        if i >= 1:
            sched.step()
            sched.step()
    sched.run()
    return [p for n in lengths for p in _compare(f"prompt {n}", sched.seqs[n].output, expected[n])]


def chunked(driver, path, prompts, expected) -> list[str]:
    longest, shortest = max(prompts), min(prompts)
    sched = Scheduler(driver)
    sched.add(longest, prompts[longest], NUM_NEW, chunk=CHUNK)
    if shortest != longest:
        sched.add(shortest, prompts[shortest], NUM_NEW)
    sched.run()
    return [p for n in {longest, shortest}
            for p in _compare(f"prompt {n}", sched.seqs[n].output, expected[n])]


def _blocks(sched: Scheduler, count: int) -> list[int]:
    """``count`` fresh block ids (alloc counts the model's state blocks in)."""
    return sched.alloc((count - sched.driver.state_blocks) * sched.driver.block_size)


def forked(driver, path, prompts, expected) -> list[str]:
    """Fork mid-block, as the kernel does: the child shares the parent's full KV blocks and gets
    copies of its recurrent-state blocks (if any) and of its partial block, in its first step."""
    n = sorted(prompts)[len(prompts) // 2]
    sched = Scheduler(driver)
    parent = sched.add(1, prompts[n], NUM_NEW)
    for _ in range(FORK_AFTER):
        sched.step()
    k, bs = driver.state_blocks, driver.block_size
    num_full, partial = divmod(parent.num_computed, bs) if driver.token_blocks else (0, 0)   # Mamba: state only
    child_prompt = parent.tokens + FORK_INPUT
    own = sched.alloc(len(child_prompt) + NUM_NEW - num_full * bs)        # state blocks first
    table = own[:k] + parent.block_ids[k:k + num_full] + own[k:]
    copies = list(zip(parent.block_ids[:k], own[:k]))
    if partial:
        copies.append((parent.block_ids[k + num_full], own[k]))
    sched.seqs[2] = child = Seq(2, list(child_prompt), len(child_prompt), NUM_NEW, table,
                                num_computed=parent.num_computed)
    sched.step(copies=copies)
    sched.run()
    return (_compare(f"parent (prompt {n})", parent.output, expected[n])
            + _compare(f"child ({len(child_prompt)} tokens)", child.output,
                       hf_greedy(path, child_prompt, NUM_NEW)))


def swapped(driver, path, prompts, expected) -> list[str]:
    """Swap a sequence out to host blocks and back into other device blocks, two steps in
    which another sequence goes on decoding."""
    n, other = sorted(prompts)[len(prompts) // 2], min(prompts)
    sched = Scheduler(driver)
    for m in {n, other}:
        sched.add(m, prompts[m], NUM_NEW)
    for _ in range(FORK_AFTER):
        sched.step()
    seq = sched.seqs.pop(n)                        # off the device
    used = driver.blocks_for(seq.num_computed)
    host, moved = list(range(used)), _blocks(sched, len(seq.block_ids))
    sched.step(swap_out=list(zip(seq.block_ids[:used], host)))
    sched.step(swap_in=list(zip(host, moved[:used])))
    seq.block_ids = moved
    sched.seqs[n] = seq
    sched.run()
    return [p for m in sched.seqs for p in _compare(f"prompt {m}", sched.seqs[m].output, expected[m])]


def recomputed(driver, path, prompts, expected) -> list[str]:
    """Drop a sequence's KV and rebuild it in fresh blocks from its tokens in one prefill."""
    n = max(prompts)
    sched = Scheduler(driver)
    seq = sched.add(1, prompts[n], NUM_NEW)
    for _ in range(FORK_AFTER):
        sched.step()
    seq.block_ids, seq.num_computed = _blocks(sched, len(seq.block_ids)), 0
    sched.run()
    return _compare(f"prompt {n}", seq.output, expected[n])


SCENARIOS = {"alone": alone, "batched": batched, "chunked": chunked, "forked": forked, "swapped": swapped,
             "recomputed": recomputed}
