"""Many LoRA adapters in one batch: greedy output through the driver equals peft's merged
model under transformers' own generate, token for token, whatever mix of adapters (and none)
shares a forward pass, however adapters move between host memory and device slots; bad
adapters are refused with clear errors, and a batch without adapters is bit-identical to a
driver that never loaded one."""
from __future__ import annotations

import dataclasses
import json
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from fixtures_models import (NUM_BLOCKS, NUM_HOST_BLOCKS, ToyScheduler, hf_greedy, prompt_of,
                             tiny_models)  # noqa: F401  (fixture)
from llmos.drivers.batch import SeqChunk, StepPlan
from llmos.drivers.default_model import make_tiny_model
from llmos.drivers.lora_layers import BatchedLoRALinear, LoRABatch, lora_delta
from llmos.drivers.model import ModelDriver

NEW = 16
BLOCK_SIZE = 4

# Adapters by name: different ranks, targets, rsLoRA and per-module rank/alpha patterns.
SPECS = {
    "A": dict(r=4, lora_alpha=1, target_modules=["q_proj", "v_proj"]),
    "B": dict(r=8, lora_alpha=2, target_modules=["k_proj", "o_proj", "up_proj", "down_proj"],
              use_rslora=True, rank_pattern={"down_proj": 2}),
    "C": dict(r=2, lora_alpha=2, target_modules=["gate_proj", "up_proj"],
              alpha_pattern={"up_proj": 1}),
    "gpt2": dict(r=4, lora_alpha=2, target_modules=["c_attn", "c_proj"]),   # Conv1D layers
}


def make_adapter(base_path: str, out_dir: Path, spec: str, seed: int = 0) -> str:
    """peft adapter ``spec`` for the model at ``base_path``, random non-zero A and B
    (``init_lora_weights=False``), saved with ``save_pretrained``; built once per directory."""
    if not (out_dir / "adapter_model.safetensors").exists():
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **SPECS[spec]))
        peft_model.save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="module")
def adapter_of(tiny_models, tmp_path_factory):
    """(arch, spec) -> directory of that adapter for the tiny ``arch`` model."""
    root = tmp_path_factory.mktemp("adapters")
    return lambda arch, spec: make_adapter(tiny_models[arch], root / f"{arch}-{spec}", spec,
                                           seed=sorted(SPECS).index(spec))


@lru_cache(maxsize=None)
def merged_model(base_path: str, adapter_path: str):
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_path).merge_and_unload().eval()


def merged_greedy(base_path: str, adapter_path: str | None, prompt: list[int],
                  num_new: int = NEW) -> list[int]:
    """Reference: peft's merged model (or the plain base) under HF generate, no EOS."""
    if adapter_path is None:
        return hf_greedy(base_path, prompt, num_new)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = merged_model(base_path, adapter_path).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new, do_sample=False,
            eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def load_driver(path: str, adapter_slots: int = 4) -> ModelDriver:
    driver = ModelDriver(path, device="cpu", dtype="float32", block_size=BLOCK_SIZE,
                         adapter_slots=adapter_slots)
    driver.allocate_kv(NUM_BLOCKS, NUM_HOST_BLOCKS)
    return driver


class LoRAScheduler(ToyScheduler):
    """ToyScheduler whose sequences carry an adapter name; records each step's chunks as
    (adapter, num_tokens) pairs."""

    def __init__(self, driver: ModelDriver):
        super().__init__(driver)
        self.adapter_of: dict[int, str | None] = {}
        self.steps: dict[int, list[tuple[str | None, int]]] = {}

    def add(self, pid, prompt, max_new, adapter: str | None = None, **kw):
        self.adapter_of[pid] = adapter
        return super().add(pid, prompt, max_new, **kw)

    def chunk_for(self, seq):
        chunk = dataclasses.replace(super().chunk_for(seq), adapter=self.adapter_of[seq.pid])
        self.steps.setdefault(self.step_id, []).append((chunk.adapter, chunk.num_tokens))
        return chunk

    def restart(self) -> None:
        """Forget finished sequences and reuse the blocks (their KV is no longer needed)."""
        self.seqs.clear()
        self.next_block = 0


def where(driver: ModelDriver) -> dict[str, str]:
    return {a["name"]: a["where"] for a in driver.adapters()}


def one_step(driver: ModelDriver, *adapters: str | None, step_id: int = 0) -> dict[int, int]:
    """One plan: a 6-token prefill per adapter, each in its own blocks."""
    chunks = [SeqChunk(pid, prompt_of(6, pid), 0, [2 * pid, 2 * pid + 1], adapter=a)
              for pid, a in enumerate(adapters)]
    return driver.execute(StepPlan(step_id, chunks)).sampled


# -- the seam -------------------------------------------------------------------------------

def test_lora_delta_equals_a_per_token_gather():
    """The contract a fused kernel must meet: row t gets scales[s] * B[s] A[s] x[t] for its
    slot s, zero for slot -1; with groups from the plan or derived from slot_ids."""
    torch.manual_seed(0)
    S, R, d_in, d_out = 3, 4, 16, 24
    A, B = torch.randn(S, R, d_in), torch.randn(S, d_out, R)
    scales = torch.tensor([0.5, 2.0, 1.5])
    spans = [(2, 5), (-1, 3), (0, 1), (2, 1), (-1, 1)]
    batch = LoRABatch.build(spans, torch.device("cpu"))
    x = torch.randn(batch.slot_ids.shape[0], d_in)
    gathered = torch.einsum("tr,tor->to", torch.einsum("ti,tri->tr", x, A[batch.slot_ids]),
                            B[batch.slot_ids]) * scales[batch.slot_ids, None]
    expected = torch.where(batch.slot_ids[:, None] >= 0, gathered, 0.0)
    torch.testing.assert_close(lora_delta(x, batch.slot_ids, A, B, scales, batch.groups), expected)
    torch.testing.assert_close(lora_delta(x, batch.slot_ids, A, B, scales), expected)
    assert LoRABatch.build([(-1, 4)], torch.device("cpu")) is None


# -- exactness ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,spec", [("llama", "A"), ("qwen3", "B"), ("gpt2", "gpt2")])
def test_greedy_with_adapter_matches_peft_merged_generate(arch, spec, tiny_models, adapter_of):
    path, adapter = tiny_models[arch], adapter_of(arch, spec)
    prompt = prompt_of(23)
    driver = load_driver(path)
    info = driver.load_adapter("ad", adapter)
    assert info["rank"] == SPECS[spec]["r"] and info["bytes"] > 0
    sched = LoRAScheduler(driver)
    seq = sched.add(1, prompt, NEW, adapter="ad")
    sched.run()
    expected = merged_greedy(path, adapter, prompt)
    assert expected != hf_greedy(path, prompt, NEW), "the adapter must change the output"
    assert seq.output == expected


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_adapters_of_different_rank_and_targets_and_none_share_one_forward_pass(
        arch, tiny_models, adapter_of):
    """A (rank 4, attention q/v), B (rank 8 with a rank-2 layer, rsLoRA, k/o/MLP) and no
    adapter in the same plans: prefills beside decodes, a chunked prefill, and two sequences
    on A whose rows are not contiguous in the packed batch."""
    path = tiny_models[arch]
    paths = {"A": adapter_of(arch, "A"), "B": adapter_of(arch, "B"), None: None}
    driver = load_driver(path)
    driver.load_adapter("A", paths["A"])
    driver.load_adapter("B", paths["B"])
    sched = LoRAScheduler(driver)
    runs = {1: ("A", prompt_of(17, 1)), 2: ("B", prompt_of(31, 2)), 3: (None, prompt_of(9, 3)),
            4: ("A", prompt_of(5, 4))}
    sched.add(1, runs[1][1], NEW, adapter="A")
    sched.add(2, runs[2][1], NEW, adapter="B", chunk=13)
    sched.step()
    sched.step()
    sched.add(3, runs[3][1], NEW)
    sched.add(4, runs[4][1], NEW, adapter="A")
    sched.run()
    mixed = [s for s in sched.steps.values()
             if {a for a, _ in s} == {"A", "B", None} and {n > 1 for _, n in s} == {True, False}]
    assert mixed, "some forward pass must hold A, B and none, prefill and decode"
    for pid, (adapter, prompt) in runs.items():
        expected = merged_greedy(path, paths[adapter], prompt)
        assert sched.seqs[pid].output == expected, f"pid {pid}"
        if adapter is not None:     # else a slot mix-up could go unseen
            assert expected != hf_greedy(path, prompt, NEW), f"pid {pid}: adapter without effect"


def test_more_adapters_than_slots_swap_lru_and_stay_exact(tiny_models, adapter_of):
    path = tiny_models["llama"]
    paths = {s: adapter_of("llama", s) for s in "ABC"}
    driver = load_driver(path, adapter_slots=2)
    for s in "ABC":
        driver.load_adapter(s, paths[s])
    assert set(where(driver).values()) == {"host"}
    host_bytes = driver.adapter_bytes()["host"]
    sched = LoRAScheduler(driver)
    prompt = prompt_of(13, 9)
    expected_where = [{"A": "device", "B": "host", "C": "host"},
                      {"A": "device", "B": "device", "C": "host"},
                      {"A": "host", "B": "device", "C": "device"},     # A was least recent
                      {"A": "device", "B": "host", "C": "device"}]     # then B
    for adapter, expected in zip("ABCA", expected_where):
        sched.restart()
        seq = sched.add(1, prompt, NEW, adapter=adapter)
        sched.run()
        assert seq.output == merged_greedy(path, paths[adapter], prompt), adapter
        assert where(driver) == expected
    slots = {a["slot"] for a in driver.adapters() if a["where"] == "device"}
    assert slots == {0, 1}
    assert driver.adapter_bytes()["host"] == host_bytes
    driver.unload_adapter("A")
    assert where(driver) == {"B": "host", "C": "device"}


def test_lru_never_evicts_an_adapter_of_the_current_plan(tiny_models, adapter_of):
    driver = load_driver(tiny_models["llama"], adapter_slots=2)
    for s in "ABC":
        driver.load_adapter(s, adapter_of("llama", s))
    one_step(driver, "A", step_id=0)
    one_step(driver, "B", step_id=1)
    one_step(driver, "A", "C", None, step_id=2)    # A is least recent but needed: B goes
    assert where(driver) == {"A": "device", "B": "host", "C": "device"}
    last_used = {a["name"]: a["last_used"] for a in driver.adapters()}
    assert last_used["A"] >= last_used["B"] and last_used["C"] >= last_used["B"]


def test_batch_without_adapters_is_bit_identical_to_a_driver_without_adapters(
        tiny_models, adapter_of):
    """Adapters loaded, resident and their layers wrapped; a batch that names none of them
    gives exactly the logits of a driver that never loaded one."""
    path = tiny_models["qwen3"]
    plain, lora = load_driver(path), load_driver(path)
    for s in "AB":
        lora.load_adapter(s, adapter_of("qwen3", s))
    one_step(lora, "A", "B")
    assert set(where(lora).values()) == {"device"}
    assert any(isinstance(m, BatchedLoRALinear) for m in lora.model.modules())
    logits = {}
    for name, driver in (("plain", plain), ("lora", lora)):
        captured = logits[name] = []
        driver._lm_head.register_forward_hook(lambda m, i, out, c=captured: c.append(out.clone()))
        sched = LoRAScheduler(driver)
        sched.add(1, prompt_of(19, 1), 6)
        sched.step()
        sched.add(2, prompt_of(7, 2), 6)
        sched.run()
    assert len(logits["plain"]) == len(logits["lora"]) > 0
    for a, b in zip(logits["plain"], logits["lora"]):
        assert torch.equal(a, b)


# -- errors ---------------------------------------------------------------------------------

def test_unknown_adapter_in_plan_raises_key_error(tiny_models, adapter_of):
    driver = load_driver(tiny_models["llama"])
    with pytest.raises(KeyError, match="nope"):
        one_step(driver, None, "nope")
    driver.load_adapter("A", adapter_of("llama", "A"))
    driver.unload_adapter("A")
    with pytest.raises(KeyError):
        one_step(driver, "A")
    with pytest.raises(KeyError):
        driver.unload_adapter("A")


def test_more_distinct_adapters_in_one_plan_than_slots_raises_value_error(tiny_models,
                                                                        adapter_of):
    driver = load_driver(tiny_models["llama"], adapter_slots=2)
    for s in "ABC":
        driver.load_adapter(s, adapter_of("llama", s))
    with pytest.raises(ValueError, match="2 adapter slots"):
        one_step(driver, "A", "B", "C")
    one_step(driver, "A", "B", "A", None)       # two distinct adapters fit


def test_missing_adapter_directory_or_file_raises_file_not_found(tiny_models, adapter_of,
                                                                 tmp_path):
    driver = load_driver(tiny_models["llama"])
    with pytest.raises(FileNotFoundError):
        driver.load_adapter("x", str(tmp_path / "absent"))
    partial = tmp_path / "partial"
    shutil.copytree(adapter_of("llama", "A"), partial)
    (partial / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        driver.load_adapter("x", str(partial))
    assert driver.adapters() == []


def test_adapter_made_for_other_shapes_or_modules_raises_value_error(tiny_models, adapter_of,
                                                                     tmp_path):
    """A llama adapter made on a llama with a narrower MLP, and a gpt2 adapter on llama.
    Nothing is loaded or wrapped after a refusal."""
    narrow = make_tiny_model("llama", tmp_path / "narrow-llama", intermediate_size=96)
    driver = load_driver(tiny_models["llama"])
    with pytest.raises(ValueError, match="do not fit"):
        driver.load_adapter("x", make_adapter(narrow, tmp_path / "narrow-C", "C"))
    with pytest.raises(ValueError, match="no module"):
        driver.load_adapter("x", adapter_of("gpt2", "gpt2"))
    assert driver.adapters() == [] and driver.adapter_bytes() == {"host": 0, "device": 0}
    assert not any(isinstance(m, BatchedLoRALinear) for m in driver.model.modules())


def test_rank_zero_and_corrupt_safetensors_raise_value_error(tiny_models, adapter_of,
                                                             tmp_path):
    driver = load_driver(tiny_models["llama"])
    rank0 = tmp_path / "rank0"
    shutil.copytree(adapter_of("llama", "A"), rank0)
    config = json.loads((rank0 / "adapter_config.json").read_text())
    (rank0 / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    with pytest.raises(ValueError, match="rank"):
        driver.load_adapter("x", str(rank0))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapter_of("llama", "A"), corrupt)
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(b"\xff" * 16 + data[16:100])
    with pytest.raises(ValueError, match="safetensors"):
        driver.load_adapter("x", str(corrupt))
    assert driver.adapters() == []
