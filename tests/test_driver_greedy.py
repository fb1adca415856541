"""Greedy output of the paged model driver equals transformers' own generate, token for
token, for every supported architecture: alone, batched with others, and with chunked prefill."""
from __future__ import annotations

import pytest

from fixtures_models import (ARCHITECTURES, ToyScheduler, hf_greedy, load_driver, prompt_of,
                             tiny_models)  # noqa: F401  (fixture)

NEW = 20


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_single_sequence_matches_hf_generate(arch, tiny_models):
    path = tiny_models[arch]
    prompt = prompt_of(23)
    sched = ToyScheduler(load_driver(path))
    seq = sched.add(1, prompt, NEW)
    sched.run()
    assert seq.output == hf_greedy(path, prompt, NEW)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_batched_prefill_and_decode_mix_matches_hf_generate(arch, tiny_models):
    """Sequences of different lengths join at different steps, so one forward pass holds a
    prefill next to decodes (and, at step 0, two prefills)."""
    path = tiny_models[arch]
    prompts = {1: prompt_of(5, 1), 2: prompt_of(31, 2), 3: prompt_of(17, 3), 4: prompt_of(40, 4)}
    sched = ToyScheduler(load_driver(path))
    sched.add(1, prompts[1], NEW)
    sched.add(2, prompts[2], NEW)
    for _ in range(3):
        sched.step()
    sched.add(3, prompts[3], NEW)
    sched.step()
    sched.add(4, prompts[4], NEW)
    sched.run()
    for pid, prompt in prompts.items():
        assert sched.seqs[pid].output == hf_greedy(path, prompt, NEW), f"pid {pid}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_chunked_prefill_matches_hf_generate(arch, tiny_models):
    """A 37-token prompt fed in chunks of 13 (three steps, no sample until the last), while
    another sequence decodes alongside."""
    path = tiny_models[arch]
    long_prompt, short_prompt = prompt_of(37, 5), prompt_of(9, 6)
    sched = ToyScheduler(load_driver(path))
    chunked = sched.add(1, long_prompt, NEW, chunk=13)
    other = sched.add(2, short_prompt, NEW)
    first = sched.step()
    assert 1 not in first.sampled and 2 in first.sampled   # prefill chunk 1 does not sample
    sched.run()
    assert chunked.output == hf_greedy(path, long_prompt, NEW)
    assert other.output == hf_greedy(path, short_prompt, NEW)


def test_block_size_does_not_change_output(tiny_models):
    """The default 16-token blocks and odd 5-token blocks give the same greedy text."""
    path = tiny_models["qwen3"]
    prompt = prompt_of(29, 7)
    outputs = []
    for block_size in (16, 5):
        sched = ToyScheduler(load_driver(path, block_size=block_size))
        seq = sched.add(1, prompt, NEW)
        sched.run()
        outputs.append(seq.output)
    assert outputs[0] == outputs[1] == hf_greedy(path, prompt, NEW)
