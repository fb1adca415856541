"""The built-in default model: deterministic, offline, loadable, with a working tokenizer."""
from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

from fixtures_models import ToyScheduler, hf_greedy, load_driver, prompt_of
from llmos.drivers.default_model import (DEFAULT_MODEL_NAME, build_tokenizer,
                                         ensure_default_model, make_tiny_model)
from llmos.drivers.model import ModelDriver

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnewlines  ", "naïve café — 你好, мир 🎉🚀",
         "def f(x): return {'a': [1, 2]}", ""]


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory) -> str:
    return ensure_default_model(tmp_path_factory.mktemp("state"))


def test_default_model_is_deterministic_and_idempotent(default_dir, tmp_path):
    assert default_dir.endswith(os.path.join("models", DEFAULT_MODEL_NAME))
    weights = os.path.join(default_dir, "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    assert ensure_default_model(os.path.dirname(os.path.dirname(default_dir))) == default_dir
    assert os.stat(weights).st_mtime_ns == mtime                 # second call rewrote nothing
    other = load_file(os.path.join(ensure_default_model(tmp_path), "model.safetensors"))
    first = load_file(weights)
    assert first.keys() == other.keys()
    assert all(first[k].equal(other[k]) for k in first)
    with open(os.path.join(default_dir, "tokenizer.json")) as a, \
            open(os.path.join(tmp_path, "models", DEFAULT_MODEL_NAME, "tokenizer.json")) as b:
        assert a.read() == b.read()


def test_default_model_loads_as_tiny_llama(default_dir):
    driver = ModelDriver(default_dir, device="cpu")
    assert driver.architecture == "LlamaForCausalLM"
    assert driver.name == DEFAULT_MODEL_NAME
    assert driver.dtype == "float32"
    assert 512 <= len(driver.tokenizer) <= 2048 == driver.max_model_len
    assert driver.config.vocab_size == len(driver.tokenizer)
    assert driver.num_params < 1_000_000
    assert driver.eos_token_ids == {driver.tokenizer.eos_token_id}


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text_including_unicode(default_dir, text):
    driver = ModelDriver(default_dir, device="cpu")
    ids = driver.encode(text)
    assert all(0 <= i < len(driver.tokenizer) for i in ids)
    assert driver.decode(ids) == text


def test_tokenizer_compresses_english():
    tok = build_tokenizer()
    text = "The kernel schedules processes and pages their memory."
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_chat_template_produces_ids_ending_with_assistant_prompt(default_dir):
    driver = ModelDriver(default_dir, device="cpu")
    ids = driver.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "héllo"}])
    tok = driver.tokenizer
    assert ids[0] == tok.bos_token_id
    assert ids[-2:] == tok.convert_tokens_to_ids(["<|assistant|>"]) + tok.encode("\n")
    assert "héllo" in tok.decode(ids)


def test_chat_template_fallback_without_template(default_dir):
    driver = ModelDriver(default_dir, device="cpu")
    driver.tokenizer.chat_template = None
    ids = driver.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == driver.tokenizer.bos_token_id
    assert driver.decode(ids) == "user: hi\n\nassistant: "


def test_tiny_model_overrides_are_applied(tmp_path):
    path = make_tiny_model("llama", tmp_path / "wide", num_hidden_layers=3)
    driver = load_driver(path)
    assert driver.num_layers == 3
    sched = ToyScheduler(driver)
    seq = sched.add(1, prompt_of(9), 8)
    sched.run()
    assert seq.output == hf_greedy(path, prompt_of(9), 8)


def test_unknown_architecture_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture"):
        make_tiny_model("bloom", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_models_with_rescaled_logits_apply_it_as_the_model_does(tmp_path):
    """Gemma2 soft-caps its final logits: the driver applies the cap (it used to refuse the
    model; the load-time gate now checks the logits against the model's own)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config

    from llmos.drivers.default_model import build_tokenizer
    from llmos.drivers.model import ModelDriver
    tok = build_tokenizer(tmp_path)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    driver = ModelDriver(str(tmp_path), device="cpu")
    logits = driver.logits(torch.randn(4, 32) * 100)
    assert logits.abs().max() <= 3.0 and logits.abs().max() > 2.9
