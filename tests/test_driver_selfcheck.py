"""The load-time gate: a model whose paged path is not its own forward pass is refused at load,
with the reason, instead of being served silently wrong (issue 13's first item)."""
import os
import tempfile

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from fixtures_models import tiny_models  # noqa: F401
from llmos.drivers import selfcheck
from llmos.drivers.default_model import build_tokenizer
from llmos.drivers.model import ModelDriver


def build(config_class, sinks_std: float = 0.0, **sizes) -> str:
    """A tiny random checkpoint of ``config_class`` with the offline tokenizer; ``sinks_std``:
    random attention sinks (GPT-OSS initialises them to zero)."""
    path = tempfile.mkdtemp(prefix="llmos-arch-")
    tok = build_tokenizer(path)
    cfg = config_class(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, initializer_range=0.2, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for module in model.modules():
        if sinks_std and isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            torch.nn.init.normal_(module.sinks, std=sinks_std)
    model.save_pretrained(path)
    return path


REFUSED = {   # accepted before the gate, then silently wrong or failing on the first step
    "bloom": (transformers.BloomConfig, dict(hidden_size=64, n_layer=2, n_head=4), "no layer calls"),
    "mpt": (transformers.MptConfig, dict(d_model=64, n_layers=2, n_heads=4), "fails on one token"),
    # RWKV's recurrence lives in its own code, not in transformers' cache
    "rwkv": (transformers.RwkvConfig, dict(hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                                           intermediate_size=128), "no layer calls"),
    "falcon": (transformers.FalconConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
               "attention interface"),
}


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_a_model_the_paged_path_cannot_serve_exactly_is_refused_at_load(arch):
    config_class, sizes, reason = REFUSED[arch]
    with pytest.raises(ValueError, match=reason):
        ModelDriver(build(config_class, **sizes), device="cpu", dtype="float32", block_size=4)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_architectures_served_exactly_pass_the_gate(tiny_models, arch):
    driver = ModelDriver(tiny_models[arch], device="cpu", dtype="float32", block_size=4)
    assert driver.kv is None                     # the check's own small pool is gone


def test_the_gate_compares_every_position_of_a_chunked_prefill_and_decodes(tiny_models, monkeypatch):
    driver = ModelDriver(tiny_models["llama"], device="cpu", dtype="float32", block_size=4)
    real = driver.forward
    seen = []

    def forward(chunks, lora_batch=None):
        seen.append([(c.start_pos, c.num_tokens) for c in chunks])
        return real(chunks, lora_batch)
    monkeypatch.setattr(driver, "forward", forward)
    selfcheck.check(driver)
    assert seen == [[(0, 9)], [(9, 8)], [(17, 1)], [(18, 1)], [(19, 1)], [(20, 1)]]
    lost = []                                    # a decode step that forgets the cached KV differs

    def amnesic(chunks, lora_batch=None):
        if chunks[0].num_tokens == 1:
            lost.append(1)
            chunks = [type(c)(pid=c.pid, token_ids=c.token_ids, start_pos=0, block_ids=c.block_ids)
                      for c in chunks]
        return real(chunks, lora_batch)
    monkeypatch.setattr(driver, "forward", amnesic)
    with pytest.raises(ValueError, match="in a decode step"):
        selfcheck.check(driver)
    assert lost


def test_a_pass_is_remembered_for_the_same_checkpoint_and_conditions_only(tiny_models, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMOS_SELFCHECK_CACHE", str(tmp_path))
    runs = []
    real = selfcheck.check
    monkeypatch.setattr(selfcheck, "check", lambda driver: (runs.append(driver.block_size), real(driver)))
    path = tiny_models["llama"]
    for block_size in (4, 4, 8):
        ModelDriver(path, device="cpu", dtype="float32", block_size=block_size)
    assert runs == [4, 8]                      # the second load at block size 4 skipped it
    config = f"{path}/config.json"
    stat = os.stat(config)
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))   # the checkpoint changed
    ModelDriver(path, device="cpu", dtype="float32", block_size=4)
    assert runs == [4, 8, 4]


def test_a_refusal_is_never_remembered(tiny_models, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMOS_SELFCHECK_CACHE", str(tmp_path))
    runs = []

    def refuse(driver):
        runs.append(1)
        raise ValueError("differs")
    monkeypatch.setattr(selfcheck, "check", refuse)
    for _ in range(2):
        with pytest.raises(ValueError, match="differs"):
            ModelDriver(tiny_models["llama"], device="cpu", dtype="float32", block_size=4)
    assert runs == [1, 1] and not any(tmp_path.iterdir())


JAMBA = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             num_experts=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
             mamba_d_state=8)


def test_recurrent_layers_that_scan_each_chunk_from_zero_pass_stepwise_and_it_is_remembered(monkeypatch, tmp_path):
    """Jamba's Mamba layers ignore a saved state over a chunk of several tokens: the gate finds
    that only the second prefill chunk differs, and passes the model stepwise (such chunks
    continue one token per pass); the remembered pass keeps that. Without stepwise it differs."""
    monkeypatch.setenv("LLMOS_SELFCHECK_CACHE", str(tmp_path))
    path = build(transformers.JambaConfig, **JAMBA)
    driver = ModelDriver(path, device="cpu", dtype="float32", block_size=4)
    assert driver.stepwise and driver.recurrent is not None
    assert ModelDriver(path, device="cpu", dtype="float32", block_size=4).stepwise    # from the cached pass
    driver.stepwise = False
    with pytest.raises(ValueError, match="second prefill chunk"):
        selfcheck._compare(driver)


def test_a_model_that_continues_its_state_over_a_chunk_is_not_made_stepwise(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMOS_SELFCHECK_CACHE", str(tmp_path))
    path = build(transformers.Lfm2Config, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, num_hidden_layers=4, layer_types=["conv", "full_attention"] * 2)
    for _ in range(2):
        assert not ModelDriver(path, device="cpu", dtype="float32", block_size=4).stepwise
