"""Device drivers: what the accelerator (or the CPU) has, and host memory for swap.

``detect()`` returns the device the kernel should run on. ``Device.info()`` is telemetry as a
plain dict (msgpack-able: str / int / float / None), ``free_bytes()`` is what the memory
manager may still size its KV pool from. CUDA telemetry comes from NVML (nvidia-ml-py) when
it is importable and initialises, and from ``torch.cuda`` otherwise; CPU from psutil.
"""
from __future__ import annotations

import platform
import re
from functools import lru_cache
from typing import Any

import psutil
import torch

INFO_KEYS = ("kind", "name", "total_bytes", "free_bytes", "used_bytes", "utilization_pct",
             "temperature_c", "power_w")


class Device:
    """One compute device. ``kind`` is "cpu" or "cuda"; ``torch_device`` is where tensors go."""

    def __init__(self, torch_device: torch.device):
        self.torch_device = torch_device
        self.kind = torch_device.type
        self.name = "cpu"

    def info(self) -> dict[str, Any]:
        raise NotImplementedError

    def free_bytes(self) -> int:
        raise NotImplementedError

    def empty_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed host tensor for swap space: pinned on CUDA (fast async copies)."""
        return torch.zeros(shape, dtype=dtype, pin_memory=self.kind == "cuda")

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU)."""

    def __repr__(self) -> str:
        return f"Device({str(self.torch_device)!r}, name={self.name!r})"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


class CPUDevice(Device):
    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.name = _cpu_name()
        psutil.cpu_percent(interval=None)   # prime the counter: the first call always says 0.0

    def free_bytes(self) -> int:
        return int(psutil.virtual_memory().available)

    def info(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        return {"kind": "cpu", "name": self.name, "total_bytes": int(vm.total),
                "free_bytes": int(vm.available), "used_bytes": int(vm.total - vm.available),
                "utilization_pct": float(psutil.cpu_percent(interval=None)),
                "temperature_c": _cpu_temperature(), "power_w": None}


def _cpu_temperature() -> float | None:
    """Hottest current sensor reading, or None where the platform has none."""
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        readings = [t.current for temps in read().values() for t in temps if t.current]
    except (OSError, RuntimeError):
        return None
    return float(max(readings)) if readings else None


@lru_cache(maxsize=1)
def _nvml():
    """The initialised pynvml module, or None (not installed, no driver, ...)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, NVMLError_LibraryNotFound, driver errors: all mean "no NVML"
        return None


class CUDADevice(Device):
    def __init__(self, index: int):
        super().__init__(torch.device("cuda", index))
        self.index = index
        props = torch.cuda.get_device_properties(index)
        self.name = props.name
        self._total = int(props.total_memory)
        self._handle = self._nvml_handle(props)

    def _nvml_handle(self, props):
        """NVML's handle for this GPU, matched by UUID: under CUDA_VISIBLE_DEVICES torch's
        index and NVML's index differ."""
        nvml = _nvml()
        if nvml is None:
            return None
        try:
            uuid = str(getattr(props, "uuid", ""))
            if uuid:
                return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            return nvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:
            return None

    def free_bytes(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.index)
        return int(free)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def info(self) -> dict[str, Any]:
        free, total = torch.cuda.mem_get_info(self.index)
        out = {"kind": "cuda", "name": self.name, "total_bytes": int(total),
               "free_bytes": int(free), "used_bytes": int(total - free),
               "utilization_pct": None, "temperature_c": None, "power_w": None}
        nvml, h = _nvml(), self._handle
        if nvml is None or h is None:
            return out
        for key, read in (
            ("utilization_pct", lambda: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)),
            ("temperature_c", lambda: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))),
            ("power_w", lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),   # milliwatts
        ):
            try:
                out[key] = read()
            except Exception:   # NVMLError_NotSupported on some boards: leave None
                pass
        return out


def detect(name: str = "auto") -> Device:
    """The device called ``name``: "auto" (CUDA when available, else CPU), "cpu", "cuda",
    or "cuda:N". Raises ValueError for unknown names or unavailable CUDA."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return CPUDevice()
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        index = torch.cuda.current_device() if match[1] is None else int(match[1])
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"no CUDA device {index} (have {torch.cuda.device_count()})")
        return CUDADevice(index)
    raise ValueError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N")
