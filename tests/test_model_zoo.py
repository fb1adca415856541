"""Every architecture is exact or refused at load (issue 13, the coverage test).

The fast subset below runs in the default suite: a few representative architectures, each with
the verdict it must have. The full sweep over every causal LM of the installed transformers is
marked ``models`` and runs with ``make test-models`` (``make test`` runs both).
"""
from __future__ import annotations

import pytest
import torch

import model_check
import model_zoo
from model_check import Verdict
from llmos.drivers.kv_cache import PagedKVCache

FAST = {
    "llama": Verdict.EXACT,
    "qwen2+sliding": Verdict.EXACT,       # full and sliding-window layers mixed, prompts past the window
    "gemma2": Verdict.EXACT,              # attention and final-logit soft-caps
    "gpt_oss": Verdict.EXACT,             # attention sinks, sliding layers, MoE
    "qwen3_moe": Verdict.EXACT,
    "gpt2": Verdict.EXACT,                # learned positions, Conv1D projections
    "phi3+longrope": Verdict.EXACT,       # long rope factors past 64 tokens, per sequence
    "deepseek_v3": Verdict.EXACT,         # MLA: values narrower than keys
    "lfm2": Verdict.EXACT,                # short convolutions: recurrent state beside the KV
    "bloom": Verdict.REFUSED,             # ALiBi outside the attention interface
    "falcon": Verdict.REFUSED,
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Where the checkpoints are built, once per module."""
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's spinning
    makes each small matmul milliseconds slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("arch", sorted(FAST))
def test_a_representative_architecture_has_its_verdict(arch, zoo):
    row = model_check.check(arch, zoo)
    assert row.verdict is FAST[arch], str(row)
    assert row.verdict is not Verdict.REFUSED or row.detail, "a refusal names its reason"
    assert "weak" not in row.detail, str(row)


def test_the_check_catches_a_driver_that_forgets_copy_on_write(zoo, monkeypatch):
    """The forked scenario is not vacuous: without the partial block's copy the child differs."""
    monkeypatch.setattr(PagedKVCache, "copy", lambda self, pairs: None)
    row = model_check.check("llama", zoo)
    assert row.verdict is Verdict.WRONG and "forked" in row.detail, str(row)


def test_the_check_catches_a_driver_that_loses_swapped_blocks(zoo, monkeypatch):
    monkeypatch.setattr(PagedKVCache, "swap_in", lambda self, pairs: None)
    row = model_check.check("llama", zoo)
    assert row.verdict is Verdict.WRONG and "swapped" in row.detail, str(row)


def test_every_architecture_of_the_mapping_is_in_the_zoo():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    assert set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) <= set(model_zoo.architectures())
    assert set(model_zoo.OVERRIDES) | set(model_zoo.NOT_BUILT) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.models
@pytest.mark.parametrize("arch", model_zoo.architectures())
def test_every_architecture_is_exact_or_refused_at_load(arch, zoo):
    """Exact token for token, or refused at load (or not buildable here) with the reason;
    never accepted and then wrong or failing."""
    row = model_check.check(arch, zoo)
    assert row.verdict.ok, str(row)
    assert row.verdict is Verdict.EXACT or row.detail, "a refusal names its reason"
