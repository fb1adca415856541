"""The zoo: every decoder architecture of the installed transformers as a tiny random checkpoint.

``architectures()`` lists the causal-LM auto mapping (one row per model type) plus a few
named variants (rope scalings, soft-caps, sinks) that the plain configs do not switch on.
``tiny_config(arch)`` shrinks the config class's defaults: a generic table of common field
names (``SIZES``) first, then the architecture's own overrides (``OVERRIDES``, field names
differ: ``n_layer``, ``d_model``, ``num_local_experts`` ...). Layer patterns keep one layer
of every kind the full-size model has (sliding and full attention, dense and MoE, attention
and recurrent), so a four-layer model still exercises each path. ``build(arch, root)`` saves
the checkpoint with the offline tokenizer; what cannot be built offline raises ``NotBuilt``
with the reason (``NOT_BUILT`` names those known in advance).

Random models are not degenerate with ``initializer_range=0.2`` (a few families need another
width): greedy output varies, so a token-for-token comparison means something. No EOS:
generation never stops early.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from llmos.drivers.default_model import build_tokenizer

SEED = 0
INIT_STD = 0.2               # random weights wide enough that greedy output varies
SLIDING_WINDOW = 16          # shorter than the longer prompts, so the window slides
MAX_PARAMS = 5_000_000       # a shrunk config that stays larger is a sub-config we cannot shrink
MAX_POSITIONS = 512          # room for every prompt and continuation of the check

# Generic field -> tiny value, applied where the config class has the field.
SIZES = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers",
                     "num_decoder_layers", "encoder_layers", "num_encoder_layers"), 4),
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "emb_dim", "embed_dim"), 64),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "attention_heads", "num_decoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "decoder_ffn_dim", "d_ff", "dff",
                     "ffn_hidden_size", "d_inner", "dim_ff", "intermediate_size_mlp"), 128),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
                     "shared_intermediate_size", "moe_shared_expert_intermediate_size",
                     "shared_experts_intermediate_size", "dense_intermediate_size"), 32),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "moe_k"), 2),
    **dict.fromkeys(("n_group", "num_expert_group"), 2), "topk_group": 1,      # grouped routing: 2 per group
    "encoder_ffn_dim": 128,                            # encoder-decoder families' unused encoder
    **dict.fromkeys(("encoder_attention_heads", "num_encoder_attention_heads"), 4),
    # MLA: K and V head dims differ on purpose (qk = nope + rope = 24, v = 16)
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_head_dim": 16, "linear_num_heads": 4,
    "mamba_d_state": 16, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_chunk_size": 16, "mamba_d_ssm": 128,
    "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "state_size": 16, "chunk_size": 16,
    "hidden_size_per_layer_input": 16, "head_dim": 16,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 16,
}
VOCAB_SIZES = ("vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size")
# Applied only where the default is set (a window the full-size model has; a cap on positions).
IF_SET = {**dict.fromkeys(("sliding_window", "attention_chunk_size", "sliding_window_size", "window_size",
                           "attention_window_size", "keep_window_size"), SLIDING_WINDOW),
          "rotary_dim": 8, "kv_channels": 16, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
          "swa_head_dim": 16, "router_hidden_size": 16, "zero_expert_num": 2,
          "floor_scale": 128}   # Llama 4 scales attention temperature past floor_scale (its context stops there)
CAPPED = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions")

# Dots 3 keeps its sliding layers' sizes apart (swa_*); Qwen4-Exp's indexed attention needs its indexer.
DOTS3_TEXT = dict(num_key_value_heads=4, swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=32,
                  swa_kv_lora_rank=16, swa_head_dim=24, swa_qk_nope_head_dim=16, swa_v_head_dim=16)
QWEN4_TEXT = dict(hc_lowrank=16, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16,
                  indexer_compress_ratio=4)
# Per architecture: fields the generic table gets wrong or misses.
OVERRIDES: dict[str, dict] = {
    # a narrower or wider init where 0.2 makes greedy output repeat one token
    "biogpt": dict(initializer_range=1.0),
    "ctrl": dict(initializer_range=0.4),
    "gemma2": dict(initializer_range=0.015),
    "gemma3": dict(initializer_range=0.02, text_config={"initializer_range": 0.02}),
    "gemma3_text": dict(initializer_range=0.01),
    "opt": dict(init_std=0.4),
    "mamba": dict(initializer_range=0.5),
    "falcon_mamba": dict(initializer_range=0.5),
    "blt": dict(encoder_hash_byte_group_vocab=64),
    "bamba": dict(attn_layer_indices=[1, 3]),
    # Llama 4's chunked attention is served within one chunk: a chunk that leaves room to check
    "llama4_text": dict(attention_chunk_size=127),
    "llama4": dict(text_config={"attention_chunk_size": 127}),
    "moshi": dict(sliding_window=MAX_POSITIONS),      # as in the real model: its window is its context
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "dbrx": dict(attn_config={"rope_theta": 1e4, "kv_n_heads": 2, "clip_qkv": 8.0},  # it reads rope_theta there
                 ffn_config={"hidden_size": 64, "ffn_hidden_size": 128, "moe_top_k": 2}),
    "dots1": dict(n_shared_experts=1, first_k_dense_replace=1),
    "dots3_note": dict(text_config=DOTS3_TEXT),
    "dots3_note_text": DOTS3_TEXT,
    "gemma3n_text": dict(initializer_range=0.05, num_kv_shared_layers=2, intermediate_size=[128] * 4,
                         activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
    "gemma4_unified": dict(vision_config=None, audio_config=None),
    "gpt_neo": dict(attention_types=[[["global", "local"], 2]]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"] * 2),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),          # layers 1 and 3 attend
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "mamba2": dict(num_heads=8),                                      # num_heads * head_dim = 2 * hidden
    "mllama": dict(text_config={"cross_attention_layers": [1]}),
    "mimo_v2_flash": dict(head_dim=24, v_head_dim=16),
    "minimax": dict(block_size=SLIDING_WINDOW),                      # lightning attention's block
    "phi4_multimodal": dict(audio_config={"num_blocks": 2, "ext_pw_out_channel": 64, "nemo_conv_channels": 64,
                                          "depthwise_separable_out_channel": 64, "chunk_size": -1}),
    "qwen4_exp": dict(text_config=QWEN4_TEXT),
    "qwen4_exp_text": QWEN4_TEXT,
    "reformer": dict(is_decoder=True, axial_pos_shape=[16, 32], axial_pos_embds_dim=[32, 32],
                     attention_head_size=16),
    "roc_bert": dict(shape_vocab_size=64, pronunciation_vocab_size=64),
    "xlstm": dict(qk_dim_factor=1.0),
    "xmod": dict(default_language="en_XX"),
    "zamba": dict(layers_block_type=["linear_attention", "hybrid"] * 2),   # two hybrids share weights
    "zamba2": dict(layers_block_type=["linear_attention", "hybrid"] * 2),
    "zaya": dict(num_experts_per_tok=1),
}

# Known in advance not to be buildable offline as a decoder-only causal LM.
DRAFTER = "a speculative-decoding drafter: it reads its target model's hidden states and KV, not input_ids"
NOT_BUILT: dict[str, str] = {
    "gemma3n": "its vision tower needs timm and Pillow, which are not installed (gemma3n_text is the text model)",
    "gemma4_assistant": DRAFTER,
    "gemma4_unified_assistant": DRAFTER,
    "musicgen": "audio: the decoder predicts several codebooks per step, not one text token",
    "musicgen_melody": "audio: the decoder predicts several codebooks per step, not one text token",
}

# Named variants: an architecture with options its default config leaves off.
ROPE = {"rope_theta": 1e4}
LONG_ROPE = 64               # original_max_position_embeddings: the longer prompts cross it
VARIANTS: dict[str, tuple[str, dict]] = {
    "phi3+longrope": ("phi3", dict(original_max_position_embeddings=LONG_ROPE, rope_parameters={
        **ROPE, "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8})),
    "llama+dynamic": ("llama", dict(rope_parameters={**ROPE, "rope_type": "dynamic", "factor": 4.0,
                                                     "original_max_position_embeddings": LONG_ROPE})),
    "llama+yarn": ("llama", dict(rope_parameters={**ROPE, "rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": LONG_ROPE})),
    "llama+llama3": ("llama", dict(rope_parameters={**ROPE, "rope_type": "llama3", "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": LONG_ROPE})),
    "llama+linear": ("llama", dict(rope_parameters={**ROPE, "rope_type": "linear", "factor": 2.0})),
    "qwen2+sliding": ("qwen2", dict(use_sliding_window=True, max_window_layers=2)),   # layers 2, 3 slide
    "granite+multipliers": ("granite", dict(logits_scaling=4.0, embedding_multiplier=2.0,
                                            residual_multiplier=0.5, attention_multiplier=0.1)),
}


class NotBuilt(Exception):
    """This architecture cannot be built here (offline, as a tiny causal LM): the reason."""


def architectures() -> list[str]:
    """Every causal-LM model type of the installed transformers, then the named variants."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + sorted(VARIANTS)


def base_of(arch: str) -> tuple[str, dict]:
    """(model type, the variant's extra overrides)."""
    return VARIANTS.get(arch, (arch, {}))


@lru_cache(maxsize=1)
def tokenizer():
    return build_tokenizer()


def _fields(config_class) -> dict:
    """Field name -> default value of a (dataclass) config class."""
    try:
        fields = dataclasses.fields(config_class)
    except TypeError:
        return {}
    out = {}
    for f in fields:
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


@lru_cache(maxsize=None)
def _default(config_class):
    try:
        return config_class()
    except Exception:
        return None


def _kinds(values) -> list:
    """The distinct entries of a per-layer list, in order of first appearance."""
    seen = []
    for v in values or ():
        if v not in seen:
            seen.append(v)
    return seen


def shrink(config_class, extra: dict | None = None, top: bool = True) -> dict:
    """Keyword arguments that make ``config_class`` tiny (sub-configs shrunk the same way)."""
    fields = _fields(config_class)
    kwargs = {name: value for name, value in SIZES.items() if name in fields}
    kwargs.update({name: value for name, value in IF_SET.items()
                   if name in fields and isinstance(fields[name], int) and not isinstance(fields[name], bool)})
    for name in CAPPED:
        if isinstance(fields.get(name), int) and fields[name] > MAX_POSITIONS:
            kwargs[name] = MAX_POSITIONS
    if isinstance(fields.get("qk_rope_head_dim"), int):
        kwargs.update(_mla_heads(fields, kwargs))
    kwargs.update({name: INIT_STD for name in ("initializer_range", "init_std") if name in fields})
    for name, sub_class in (getattr(config_class, "sub_configs", None) or {}).items():
        if sub_class is transformers.AutoConfig:       # the default instance knows which
            sub_class = type(getattr(_default(config_class), name, None))
        if isinstance(sub_class, type) and issubclass(sub_class, transformers.PreTrainedConfig):
            kwargs[name] = shrink(sub_class, top=False)
            if (config_class.sub_configs or {})[name] is transformers.AutoConfig:
                kwargs[name]["model_type"] = sub_class.model_type
    if top or "vocab_size" in fields:        # a composite's text config shares the vocabulary
        tok = tokenizer()
        kwargs.update({name: len(tok) for name in VOCAB_SIZES if name in fields or name == "vocab_size"})
        kwargs.update(bos_token_id=tok.bos_token_id, eos_token_id=None, pad_token_id=tok.pad_token_id)
    return _merged(kwargs, extra or {})


def _mla_heads(fields: dict, kwargs: dict) -> dict:
    """MLA keeps one K and V per head, and its ``head_dim`` is the rope part of a q/k head, the
    whole q/k head, or derived: keep the relation the full-size defaults have."""
    out = {"num_key_value_heads": kwargs["num_attention_heads"]} if "num_key_value_heads" in kwargs else {}
    kwargs.pop("head_dim", None)
    rope, nope = fields["qk_rope_head_dim"], fields.get("qk_nope_head_dim") or 0
    if fields.get("head_dim") == rope:
        out["head_dim"] = SIZES["qk_rope_head_dim"]
    elif fields.get("head_dim") == rope + nope:
        out["head_dim"] = SIZES["qk_rope_head_dim"] + SIZES["qk_nope_head_dim"]
    return out


def _merged(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, sub-config dicts merged rather than replaced."""
    out = dict(base)
    for name, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict) and name.endswith("config"):
            out[name] = _merged(out[name], value)
        else:
            out[name] = value
    return out


def tiny_config(arch: str):
    """The tiny config of ``arch`` (a model type or a variant name); NotBuilt if impossible."""
    model_type, variant = base_of(arch)
    if model_type in NOT_BUILT:
        raise NotBuilt(NOT_BUILT[model_type])
    config_class = CONFIG_MAPPING[model_type]
    kwargs = shrink(config_class, {**OVERRIDES.get(model_type, {}), **variant})
    try:
        config = config_class(**kwargs)
        config = _keep_every_layer_kind(config_class, config, kwargs)
    except Exception as exc:
        raise NotBuilt(f"its config does not build: {type(exc).__name__}: {exc}"[:300]) from exc
    return config


def _keep_every_layer_kind(config_class, config, kwargs):
    """A tiny hybrid keeps a layer of each kind the full-size model mixes (sliding and full
    attention, dense and MoE MLPs), cycling through them."""
    default = _default(config_class)
    if default is None:
        return config
    changed = {}
    for name in ("layer_types", "mlp_layer_types"):
        if name in kwargs or name not in _fields(config_class):     # given, or derived (a property)
            continue
        full, tiny = _kinds(getattr(default, name, None)), _kinds(getattr(config, name, None))
        if len(full) > len(tiny):
            changed[name] = full
    if not changed:
        return config
    num_layers = max(max(len(v) for v in changed.values()), config.num_hidden_layers)
    for name, kinds in changed.items():
        changed[name] = [kinds[i % len(kinds)] for i in range(num_layers)]
    return config_class(**{**kwargs, **changed, "num_hidden_layers": num_layers})


def build(arch: str, root: str | os.PathLike) -> str:
    """Save a tiny random ``arch`` checkpoint with the offline tokenizer under ``root/arch``
    (once: an existing one is returned). NotBuilt with the reason if it cannot be built."""
    path = Path(root) / arch
    if (path / "config.json").exists():
        return str(path)
    config = tiny_config(arch)
    tmp = Path(root) / f".{arch}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device("meta"):
        try:
            sizes = {name: p.numel() for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
        except Exception as exc:
            raise NotBuilt(f"{type(exc).__name__}: {exc}"[:300]) from exc
    if sum(sizes.values()) > MAX_PARAMS:
        largest = max(sizes, key=sizes.get)
        raise NotBuilt(f"still {sum(sizes.values()) / 1e6:.0f}M parameters after shrinking "
                       f"({largest}: {sizes[largest] / 1e6:.0f}M)")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            for name, param in model.named_parameters():       # GPT-OSS starts its sinks at zero
                if name.endswith("sinks") and not param.any():
                    torch.nn.init.normal_(param.data)
        model.generation_config.eos_token_id = None
        model.save_pretrained(str(tmp))
        tokenizer().save_pretrained(str(tmp))
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise NotBuilt(f"{type(exc).__name__}: {exc}"[:300]) from exc
    os.rename(tmp, path)
    return str(path)
