"""Architectures whose logits or attention scores are transformed — Granite's logits scaling,
Cohere's logit scale, Gemma 2's attention and final soft-caps, GPT-OSS's attention sinks —,
DeepSeek's MLA (keys and values of different widths) and Llama-4, whose decoder is not under
``base_model_prefix``, are exact through the paged path: alone, batched, with chunked prefill;
Gemma 2, GPT-OSS and DeepSeek through the Triton kernels too."""
import pytest
import torch
import transformers

from fixtures_models import ToyScheduler, hf_greedy, load_driver, prompt_of
from test_driver_selfcheck import build
from llmos.drivers.triton_attention import TritonBackend

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128)
MLA = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
           first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16)
ARCHS = {
    "granite": (transformers.GraniteConfig, dict(logits_scaling=4.0)),
    "cohere": (transformers.CohereConfig, dict(logit_scale=0.5)),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, sliding_window=16, final_logit_softcapping=30.0,
                                               attn_logit_softcapping=5.0)),
    "gpt_oss": (transformers.GptOssConfig, dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                sliding_window=16)),
    # MLA: keys (nope + rope, 24 wide) and values (16 wide) of different widths
    "deepseek_v3": (transformers.DeepseekV3Config, dict(num_key_value_heads=4, **MLA)),
    "deepseek_v2": (transformers.DeepseekV2Config, dict(num_key_value_heads=4, **dict(MLA, q_lora_rank=None))),
    # its decoder is not where base_model_prefix says (it failed with an output-type error)
    "llama4": (transformers.Llama4TextConfig, dict(head_dim=16, intermediate_size_mlp=128, num_local_experts=4,
                                                   num_experts_per_tok=1)),
}


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, (config_class, extra) in ARCHS.items():
        torch.manual_seed(1)
        out[name] = build(config_class, **dict(SMALL, **extra), sinks_std=1.0 if name == "gpt_oss" else 0.0)
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_transformed_logits_and_scores_are_exact(models, arch):
    path = models[arch]
    sched = ToyScheduler(load_driver(path))
    alone, chunked = sched.add(1, prompt_of(23), 20), sched.add(2, prompt_of(7, 2), 20, chunk=3)
    sched.run()
    assert alone.output == hf_greedy(path, prompt_of(23), 20)
    assert chunked.output == hf_greedy(path, prompt_of(7, 2), 20)


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss", "deepseek_v3"])
def test_soft_caps_sinks_and_mla_are_exact_through_the_triton_kernels(models, arch):
    """Gemma 2 and GPT-OSS alternate sliding-window (16) and full layers; small tiles split every
    decode three ways, so GPT-OSS's sinks go through the decode's reduction as well as the
    prefill. DeepSeek's values are narrower than its keys."""
    path = models[arch]
    backend = TritonBackend(block_m=16, block_n=16, decode_block_n=16, num_splits=3)
    sched = ToyScheduler(load_driver(path, backend=backend))
    alone, chunked = sched.add(1, prompt_of(23), 8), sched.add(2, prompt_of(7, 2), 8, chunk=3)
    sched.run()
    assert alone.output == hf_greedy(path, prompt_of(23), 8)
    assert chunked.output == hf_greedy(path, prompt_of(7, 2), 8)
