"""Device drivers: detection and telemetry."""
from __future__ import annotations

import msgpack
import pytest
import torch

from llmos.drivers.device import INFO_KEYS, detect


def test_cpu_info_has_every_key_with_sane_values():
    dev = detect("cpu")
    assert dev.kind == "cpu" and dev.torch_device == torch.device("cpu") and dev.name
    info = dev.info()
    assert set(info) == set(INFO_KEYS)
    assert info["kind"] == "cpu" and info["name"] == dev.name
    assert 0 < info["free_bytes"] <= info["total_bytes"]
    assert info["used_bytes"] == info["total_bytes"] - info["free_bytes"]
    assert 0.0 <= info["utilization_pct"] <= 100.0
    assert info["temperature_c"] is None or -50 < info["temperature_c"] < 150
    assert info["power_w"] is None
    assert msgpack.unpackb(msgpack.packb(info)) == info
    assert 0 < dev.free_bytes() <= info["total_bytes"]


def test_auto_picks_cuda_only_when_available():
    assert detect("auto").kind == ("cuda" if torch.cuda.is_available() else "cpu")
    assert detect().kind == detect("auto").kind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_gpu_is_a_clear_error(name):
    with pytest.raises(ValueError, match="CUDA is not available"):
        detect(name)


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device_names_are_rejected(name):
    with pytest.raises(ValueError):
        detect(name)


def test_host_swap_memory_is_plain_on_cpu():
    t = detect("cpu").empty_host((2, 3), torch.float16)
    assert t.shape == (2, 3) and t.dtype == torch.float16 and not t.is_pinned()
    assert t.abs().sum() == 0
