"""Models whose layers keep recurrent state (short convolutions, gated delta-net linear
attention, Mamba and Mamba-2, lightning attention) are exact: their state lives in blocks at the
front of the process's block table, so it is allocated, swapped, recomputed and forked (copied)
with the process — alone, batched, with chunked prefill, forked and through the kernel under
preemption. Recurrent-only models (Mamba) hold that state block and nothing per token; Mamba
and Jamba layers continue a saved state one token per pass (``stepwise``)."""
import pytest
import torch
import transformers

import model_zoo
from conftest import KernelProc
from fixtures_models import ToyScheduler, hf_greedy, load_driver, prompt_of
from test_driver_selfcheck import build

SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1)
HYBRIDS = {
    "lfm2": (transformers.Lfm2Config, dict(num_hidden_layers=4, layer_types=["conv", "full_attention"] * 2)),
    "qwen3_next": (transformers.Qwen3NextConfig, dict(
        num_hidden_layers=4, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16)),
    "falcon_h1": (transformers.FalconH1Config, dict(num_hidden_layers=2, mamba_d_ssm=64, mamba_n_heads=8,
                                                    mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16)),
    "bamba": (transformers.BambaConfig, dict(num_hidden_layers=4, attn_layer_indices=[1, 3], **MAMBA2)),
}
# built by the coverage sweep's zoo: a Mamba without attention, Jamba (Mamba + attention, continued
# stepwise), MiniMax (lightning attention in a cache class of its own)
ZOO = ("mamba", "mamba2", "jamba", "minimax")
NEW = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    built = {name: build(config_class, **SMALL, **extra) for name, (config_class, extra) in HYBRIDS.items()}
    root = tmp_path_factory.mktemp("zoo")
    return {**built, **{arch: model_zoo.build(arch, root) for arch in ZOO}}


@pytest.mark.parametrize("arch", sorted(HYBRIDS) + list(ZOO))
def test_alone_batched_and_chunked_are_exact(models, arch):
    path = models[arch]
    driver = load_driver(path)
    assert driver.state_blocks >= 1 and driver.recurrent.num_bytes > 0
    assert driver.token_blocks == (arch not in ("mamba", "mamba2"))
    assert driver.stepwise == (arch in ("mamba", "jamba"))
    sched = ToyScheduler(driver)
    prompts = [prompt_of(23), prompt_of(5, 2), prompt_of(17, 3)]
    seqs = [sched.add(i + 1, p, NEW, chunk=5 if i == 2 else None) for i, p in enumerate(prompts)]
    sched.run()
    for seq, prompt in zip(seqs, prompts):
        assert seq.output == hf_greedy(path, prompt, NEW), f"prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("arch", ["qwen3_next", "lfm2"])
def test_a_fork_copies_the_state_blocks_and_continues_like_its_parent(models, arch):
    """The child shares the parent's full KV blocks; its state blocks and partial block are
    copies made in the plan of its first step, over blocks that held garbage."""
    path = models[arch]
    sched = ToyScheduler(load_driver(path))
    k = sched.driver.state_blocks
    prompt = prompt_of(22, 4)                              # 5 full blocks of 4 + 2 tokens
    parent = sched.add(1, prompt, NEW)
    sched.step()
    child = sched.add(2, prompt, NEW)
    own = child.block_ids
    state, full, partial = parent.block_ids[:k], parent.block_ids[k:k + 5], parent.block_ids[k + 5]
    child.block_ids = own[:k] + full + own[k:k + 1] + own[k + 5:]
    child.tokens, child.num_computed = list(parent.tokens), parent.num_computed
    kv = sched.driver.kv
    ids = torch.tensor(own)
    kv.k[:, ids], kv.v[:, ids] = torch.randn_like(kv.k[:, ids]), torch.randn_like(kv.v[:, ids])
    sched.step(copies=list(zip(state + [partial], own[:k] + own[k:k + 1])))
    sched.run()
    expected = hf_greedy(path, prompt, NEW)
    assert parent.output == expected and child.output == expected


@pytest.mark.parametrize("arch,mode,blocks", [("qwen3_next", "recompute", 64), ("falcon_h1", "swap", 64),
                                              ("mamba", "swap", 3), ("jamba", "recompute", 24)])
def test_through_the_kernel_under_preemption_chunked_prefill_and_fork(models, arch, mode, blocks):
    """A pool too small for all five at once (the urgent one preempts), prefill chunks of at
    most 16 tokens, and a fork of an interactive process. A Mamba process holds one block
    (its state) however long it is: three blocks hold three processes."""
    path = models[arch]
    kernel = KernelProc("--kv-blocks", str(blocks), "--block-size", "4", "--max-num-seqs", "4", "--max-batched-tokens", "16",
                        "--device", "cpu", "--dtype", "float32", "--preempt-mode", mode, model=path).start()
    greedy = dict(temperature=0.0, ignore_eos=True)
    try:
        with kernel.client() as c:
            low = [prompt_of(18, 40 + i) for i in range(4)]
            pids = [c.spawn(prompt_ids=p, max_tokens=24, priority=10, **greedy) for p in low]
            urgent = prompt_of(30, 7)
            upid = c.spawn(prompt_ids=urgent, max_tokens=24, priority=-10, **greedy)
            results = [c.wait(pid, _timeout=300) for pid in pids + [upid]]
            p = prompt_of(13, 5)
            pid = c.spawn(prompt_ids=p, max_tokens=20, interactive=True, **greedy)
            assert next(iter(c.read(pid)))["token_ids"]
            (child,) = c.fork(pid, n=1)
            forked = [c.wait(pid, _timeout=300), c.wait(child, _timeout=300)]
    finally:
        kernel.cleanup()
    for prompt, result in zip(low + [urgent], results):
        assert result["token_ids"] == hf_greedy(path, prompt, 24), f"prompt of {len(prompt)} tokens"
    key = "swaps" if mode == "swap" else "recomputes"
    assert sum(r["accounting"][key] for r in results) >= 1
    want = hf_greedy(path, p, 20)
    assert [r["token_ids"] for r in forked] == [want, want]
