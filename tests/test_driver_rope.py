"""Rope variants are exact per sequence: longrope (Phi-3 128k) and dynamic NTK choose their
frequencies from each sequence's own length — batched beside sequences on the other side of
the threshold, across the threshold (Phi-3 recomputes its KV there), with chunked prefill, and
through the kernel under a small KV pool — while linear, YaRN and llama3 are plain functions of
position. The reference starts each generation as a freshly loaded model (``hf_greedy``)."""
import pytest
import transformers

from conftest import KernelProc
from fixtures_models import ToyScheduler, hf_greedy, load_driver, prompt_of
from test_driver_selfcheck import build

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128)
HALF = 8                    # head_dim 16: eight rotary frequencies
THRESHOLD = 32
ROPES = {
    "longrope": (transformers.Phi3Config, dict(
        max_position_embeddings=128, original_max_position_embeddings=THRESHOLD,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=THRESHOLD,
                             short_factor=[1.0 + 0.1 * i for i in range(HALF)],
                             long_factor=[2.0 + 0.7 * i for i in range(HALF)]))),
    "dynamic": (transformers.LlamaConfig, dict(max_position_embeddings=THRESHOLD, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=4.0))),
    "yarn": (transformers.LlamaConfig, dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=THRESHOLD))),
    "llama3": (transformers.LlamaConfig, dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=THRESHOLD))),
    "linear": (transformers.LlamaConfig, dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0))),
}
# Two prompts cross the threshold while generating, two start past it.
PROMPTS = [prompt_of(5), prompt_of(23, 1), prompt_of(41, 2), prompt_of(70, 3)]
NEW = 36


@pytest.fixture(scope="module")
def models():
    return {name: build(config_class, **SMALL, **extra) for name, (config_class, extra) in ROPES.items()}


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_every_sequence_gets_the_frequencies_of_its_own_length(models, kind):
    path = models[kind]
    sched = ToyScheduler(load_driver(path))
    seqs = [sched.add(i + 1, p, NEW, chunk=7 if i % 2 else None) for i, p in enumerate(PROMPTS)]
    sched.run()
    for seq, prompt in zip(seqs, PROMPTS):
        assert seq.output == hf_greedy(path, prompt, NEW), f"prompt of {len(prompt)} tokens"


def test_dynamic_ntk_serves_past_its_nominal_length_and_longrope_to_its_own(models):
    assert load_driver(models["dynamic"]).max_model_len == 4 * THRESHOLD       # factor 4
    assert load_driver(models["longrope"]).max_model_len == 128


def test_a_longrope_sequence_changes_kv_variant_only_where_it_crosses(models):
    rope = load_driver(models["longrope"]).rope
    assert rope.variant(5, THRESHOLD) == rope.variant(5, 1) != rope.variant(5, THRESHOLD + 1)
    assert rope.variant(5, THRESHOLD + 1) == rope.variant(5, THRESHOLD + 50)     # crossing once: one recompute
    dynamic = load_driver(models["dynamic"]).rope
    assert dynamic.variant(5, 100) == dynamic.variant(THRESHOLD, 100) != dynamic.variant(THRESHOLD + 1, 100)


@pytest.mark.parametrize("kind", ["longrope", "dynamic"])
def test_through_the_kernel_with_preemption_and_prefix_sharing(models, kind):
    """A pool of 40 blocks of 4 tokens cannot hold them all at once: processes are preempted
    (recompute) and share prefix blocks; a short sequence's cached KV (short factors) must never
    serve a long one."""
    path = models[kind]
    shared = prompt_of(20, 9)
    prompts = PROMPTS + [shared + [7], shared + prompt_of(20, 4)]
    kernel = KernelProc("--kv-blocks", "40", "--block-size", "4", "--max-num-seqs", "4", "--max-batched-tokens",
                        "32", "--device", "cpu", "--dtype", "float32", "--preempt-mode", "recompute",
                        model=path).start()
    try:
        with kernel.client() as c:
            pids = [c.spawn(prompt_ids=p, max_tokens=24, temperature=0.0, ignore_eos=True) for p in prompts]
            results = [c.wait(pid, _timeout=300) for pid in pids]
    finally:
        kernel.cleanup()
    for prompt, result in zip(prompts, results):
        assert result["token_ids"] == hf_greedy(path, prompt, 24), f"prompt of {len(prompt)} tokens"
