"""The paged KV cache under the driver: swap out/in to other blocks, fork's copy-on-write,
block moves without a forward pass, and the attention seam itself."""
from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from fixtures_models import (BLOCK_SIZE, ToyScheduler, hf_greedy, load_driver, prompt_of,
                             tiny_models)  # noqa: F401  (fixture)
from llmos.drivers import attention
from llmos.drivers.batch import SeqChunk, StepPlan

NEW = 16


@pytest.fixture(scope="module")
def paths(tiny_models):
    """The tiny models, and an MLA model whose cache holds keys and values of different widths."""
    from test_driver_heads import MLA, SMALL
    from test_driver_selfcheck import build
    import transformers
    return dict(tiny_models, deepseek_v3=build(transformers.DeepseekV3Config, **dict(SMALL, num_key_value_heads=4),
                                                **MLA))


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_swap_out_then_in_to_other_blocks_continues_identically(paths, arch):
    """KV written for a sequence, swapped to host, its device blocks overwritten by another
    sequence, then swapped back into *different* device blocks in the same step that resumes
    decoding: the output equals an uninterrupted run."""
    path = paths[arch]
    prompt = prompt_of(14, 3)
    sched = ToyScheduler(load_driver(path))
    seq = sched.add(1, prompt, NEW)
    for _ in range(4):
        sched.step()
    used = -(-seq.num_computed // BLOCK_SIZE)            # blocks holding computed KV
    host_ids = list(range(3, 3 + used))
    sched.step_id += 1
    sched.driver.execute(StepPlan(sched.step_id, swap_out=list(zip(seq.block_ids[:used], host_ids))))
    paused = sched.seqs.pop(1)
    intruder = sched.add(2, prompt_of(len(prompt) + 6, 9), 2)   # reuses nothing: new blocks
    intruder.block_ids = paused.block_ids                       # ... so hand it the old ones
    sched.run()
    new_ids = sched.alloc(len(prompt) + NEW)
    sched.seqs = {1: paused}
    paused.block_ids = new_ids
    sched.step(swap_in=list(zip(host_ids, new_ids[:used])))
    sched.run()
    assert paused.output == hf_greedy(path, prompt, NEW)


@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v3"])
def test_fork_copies_partial_block_and_children_match_parent(paths, arch):
    """After prefill, two children share the parent's full blocks and each gets a private
    copy of the partial last block (copied in the same plan as their first decode). Parent
    and both children continue to the same greedy text as transformers."""
    path = paths[arch]
    prompt = prompt_of(22, 4)                         # 5 full blocks of 4 + 2 tokens
    sched = ToyScheduler(load_driver(path))
    parent = sched.add(1, prompt, NEW)
    sched.step()                                      # prefill: KV for 22 positions
    full, partial = parent.block_ids[:5], parent.block_ids[5]
    copies = []
    for pid in (2, 3):
        child = sched.add(pid, prompt, NEW)
        own = child.block_ids[: len(child.block_ids) - 5]  # partial copy + room to grow
        child.block_ids = full + own
        child.tokens, child.num_computed = list(parent.tokens), parent.num_computed
        copies.append((partial, own[0]))
    kv = sched.driver.kv
    for pid in (2, 3):                                # reused blocks hold stale KV
        stale = torch.tensor(sched.seqs[pid].block_ids[5:])
        kv.k[:, stale] = torch.randn_like(kv.k[:, stale])
        kv.v[:, stale] = torch.randn_like(kv.v[:, stale])
    sched.step(copies=copies)
    sched.run()
    expected = hf_greedy(path, prompt, NEW)
    assert parent.output == expected
    assert sched.seqs[2].output == expected and sched.seqs[3].output == expected


def test_plan_without_chunks_only_moves_blocks(tiny_models):
    driver = load_driver(tiny_models["llama"])
    driver.kv.k[:, 7].normal_()
    driver.kv.v[:, 7].normal_()
    result = driver.execute(StepPlan(5, copies=[(7, 9)], swap_out=[(7, 2)]))
    assert result.step_id == 5 and result.sampled == {} and result.num_tokens == 0
    assert torch.equal(driver.kv.k[:, 9], driver.kv.k[:, 7])
    assert torch.equal(driver.kv.v[:, 9], driver.kv.v[:, 7])
    assert torch.equal(driver.kv.host_k[:, 2], driver.kv.k[:, 7])


def test_chunk_without_sample_returns_no_token(tiny_models):
    driver = load_driver(tiny_models["llama"])
    result = driver.execute(StepPlan(0, [SeqChunk(1, prompt_of(6), 0, [0, 1], sample=False)]))
    assert result.sampled == {} and result.num_tokens == 6


@pytest.mark.parametrize("plan_kwargs", [
    {"chunks": [SeqChunk(1, prompt_of(9), 0, [0, 1])]},          # 2 blocks of 4 < 9 tokens
    {"chunks": [SeqChunk(1, prompt_of(3), 0, [10_000])]},        # block id out of range
    {"swap_in": [(999, 0)]},                                     # host block out of range
    {"copies": [(0, 1), (2, 1)]},                                # one target written twice
])
def test_bad_plans_are_rejected_loudly(tiny_models, plan_kwargs):
    driver = load_driver(tiny_models["llama"])
    with pytest.raises(ValueError):
        driver.execute(StepPlan(0, **plan_kwargs))


def test_kv_bytes_per_block_counts_all_layers_k_and_v(tiny_models):
    driver = load_driver(tiny_models["qwen3"])     # 2 layers, 2 KV heads, head_dim 32, fp32
    assert driver.kv_bytes_per_block() == 2 * 2 * BLOCK_SIZE * 2 * 32 * 4
    assert driver.kv.k.shape == (2, 96, BLOCK_SIZE, 2, 32)
    assert driver.kv.k.element_size() * driver.kv.k[:, 0].numel() * 2 == driver.kv_bytes_per_block()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_transformers_passes_no_attention_mask(arch, tiny_models, monkeypatch):
    """The registered mask function keeps transformers from building any [T, T] mask for the
    packed batch; every layer's attention call is routed through the paged function."""
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, attention_mask))
        return attention.paged_attention_forward(module, query, key, value, attention_mask, **kwargs)

    driver = load_driver(tiny_models[arch])
    monkeypatch.setitem(AttentionInterface._global_mapping, attention.ATTN_IMPLEMENTATION, spy)
    driver.execute(StepPlan(0, [SeqChunk(1, prompt_of(7), 0, [0, 1]),
                                SeqChunk(2, prompt_of(5), 0, [2, 3])]))
    assert [layer for layer, _ in seen] == [0, 1]
    assert all(mask is None for _, mask in seen)


def test_paged_attention_outside_driver_fails_clearly():
    q = torch.zeros(1, 4, 2, 8)
    module = torch.nn.Module()
    module.layer_idx = 0
    with pytest.raises(RuntimeError, match="use_context"):
        attention.paged_attention_forward(module, q, q, q, None)
