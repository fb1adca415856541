"""The built-in default model and the tiny random models the tests use.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in-process on a
small built-in text (so it round-trips any UTF-8 string), and the weights are random from a
fixed seed. ``ensure_default_model(state_dir)`` gives every fresh machine a model to boot
with; ``make_tiny_model(arch, path)`` builds the same kind of model for llama, mistral, qwen2,
qwen3 and gpt2 so driver tests can compare against transformers' own ``generate``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

DEFAULT_MODEL_NAME = "llmos-tiny-random"
SEED = 1234
VOCAB_TARGET = 1024
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Renders ``[{"role", "content"}, ...]`` as ``<|bos|><|user|>\nhello<|eos|>\n<|assistant|>\n``.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """\
An operating system manages the hardware of a computer and offers services to the programs
that run on it. The kernel decides which process runs next, how much memory each one may use,
and when a sleeping process should wake up. A process is a program in execution: it has a
state, a priority, an owner, and a table of the memory pages it holds. When memory is scarce
the kernel swaps pages out to a slower store and brings them back when they are needed again.
Language models read text as a sequence of tokens and predict the next token from the ones
before it. Each layer of a transformer keeps keys and values for every token it has seen; the
cache of keys and values grows with the length of the text. Serving many users at once means
batching their requests into one forward pass, paging their caches in fixed-size blocks, and
sharing blocks between requests that start with the same prompt. The scheduler picks who runs
in each step, under a budget of tokens, and preempts the least important work when blocks run
out. Good systems are small, measured, and honest about what they do. The quick brown fox jumps
over the lazy dog; the five boxing wizards jump quickly. Hello, world! How are you today? What
time is it, and where are we going? Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 appear too.
def main(): return print("hello") if x == 1 else None  # code, symbols: {}[]()<>+-*/=_%$#@!?
Once upon a time there was a little model that wanted to talk. It had very few weights and a
very small vocabulary, but it tried its best, one token at a time, until the end of the story.
"""


def build_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Train the offline byte-level BPE tokenizer (deterministic) and, if ``path`` is given,
    save it there in the Hugging Face format (tokenizer.json + tokenizer_config.json)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET, min_frequency=1, show_progress=False,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())   # every byte: any text encodes
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False, model_max_length=2048)
    fast.chat_template = CHAT_TEMPLATE
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def _tiny_config(arch: str, vocab_size: int, special: dict[str, int], **overrides):
    """Config for a tiny model of ``arch``: 2 layers, 4 heads (2 KV heads where supported)."""
    common = dict(vocab_size=vocab_size, **special)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(**llama_like, **common)
    elif arch == "mistral":
        # A short window so prompts of a few dozen tokens exercise the sliding-window path.
        cfg = MistralConfig(**{**llama_like, "sliding_window": 16, **overrides}, **common)
        overrides = {}
    elif arch == "qwen2":
        # Layer 0 full attention, layer 1 sliding (max_window_layers=1): a mixed model.
        cfg = Qwen2Config(**{**llama_like, "use_sliding_window": True, "sliding_window": 16,
                             "max_window_layers": 1, **overrides}, **common)
        overrides = {}
    elif arch == "qwen3":
        cfg = Qwen3Config(**{**llama_like, "head_dim": 32}, **common)   # head_dim != hidden/heads
    elif arch == "gpt2":
        # GPT-2's default init (std 0.02) makes a random model repeat one token forever;
        # a wider init gives varied greedy output, so token-by-token comparisons mean something.
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=2048, n_inner=128,
                         initializer_range=0.2, **common)
    else:
        raise ValueError(f"unknown architecture {arch!r}: expected one of {ARCHITECTURES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def _is_complete(path: Path) -> bool:
    return all((path / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def make_tiny_model(arch: str, path: str | os.PathLike, seed: int = SEED, **overrides) -> str:
    """Create (once) a tiny random ``arch`` model with the offline tokenizer under ``path``.

    Deterministic for a given (arch, seed, overrides); idempotent (an existing complete
    directory is returned untouched). Written to a temporary sibling and renamed into place,
    so a crash or a concurrent caller never leaves a half-written model behind.
    """
    path = Path(path)
    if _is_complete(path):
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tok = build_tokenizer(tmp)
        special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
        config = _tiny_config(arch, len(tok), special, **overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        try:
            os.rename(tmp, path)
        except OSError:
            if not _is_complete(path):      # lost a race to nobody: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def ensure_default_model(state_dir: str | os.PathLike) -> str:
    """Path of the built-in default model (a tiny random Llama), creating it on first use."""
    # A wide init (std 0.2, not 0.02) gives varied greedy output, and logits that a LoRA on
    # the body can make confident: the tuner's demo teaches this model answers.
    return make_tiny_model("llama", Path(state_dir) / "models" / DEFAULT_MODEL_NAME, initializer_range=0.2)
