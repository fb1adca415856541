"""LoRA adapters: many in host memory, a few in device slots, mixed in one batch.

``read_adapter`` loads a peft-format adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``, as peft's ``save_pretrained`` writes it) and checks it against
the base model. ``AdapterSlots`` keeps the loaded adapters on the host (CPU tensors) and
``num_slots`` of them on the device inside the ``BatchedLoRALinear`` wrappers
(``llmos.drivers.lora_layers``); ``prepare(chunks)`` makes the adapters a plan names resident
(evicting the least recently used others, never one the plan needs) and returns the
per-token slot layout for the forward pass.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn

from llmos.drivers.batch import SeqChunk
from llmos.drivers.lora_layers import BatchedLoRALinear, LoRABatch, linear_features

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# peft options that change the math beyond base(x) + scale * B(A(x)): refused, not ignored.
UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens",
               "layer_replication", "target_parameters", "trainable_token_indices",
               "modules_to_save")


@dataclass
class LoRAAdapter:
    """One adapter in host memory. ``weights``: module path (as in the base model's
    ``named_modules``) -> (A [r, in], B [out, r], scaling) on the CPU."""
    name: str
    path: str
    rank: int
    alpha: float
    target_modules: list[str]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    num_bytes: int
    slot: int | None = None             # device slot, None = host only
    last_used: float | None = None      # wall time of the last plan that used it
    use_tick: int = 0                   # LRU order

    def info(self) -> dict:
        return {"name": self.name, "path": self.path, "rank": self.rank, "alpha": self.alpha,
                "target_modules": list(self.target_modules), "bytes": self.num_bytes}


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, BatchedLoRALinear) else module


def read_adapter(name: str, path: str, model: nn.Module) -> LoRAAdapter:
    """Load and validate the peft adapter in directory ``path`` for ``model`` (a transformers
    causal LM, possibly already wrapped). FileNotFoundError for a missing directory or file;
    ValueError for anything that does not fit the model or that we cannot compute exactly."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter {name!r}: no directory {path}")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(path, f)):
            raise FileNotFoundError(f"adapter {name!r}: no {f} in {path}")
    try:
        with open(os.path.join(path, CONFIG_FILE)) as fh:
            config = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"adapter {name!r}: unreadable {CONFIG_FILE}: {e}") from e
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {name!r}: not a LoRA adapter config")
    bad = [k for k in UNSUPPORTED if config.get(k)]
    if bad or config.get("bias", "none") != "none":
        raise ValueError(f"adapter {name!r}: unsupported peft options {bad or ['bias']}")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"adapter {name!r}: rank r must be a positive integer, got {rank!r}")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    try:
        tensors = load_file(os.path.join(path, WEIGHTS_FILE), device="cpu")
    except Exception as e:       # safetensors raises its own error type for a corrupt file
        raise ValueError(f"adapter {name!r}: {WEIGHTS_FILE} is not a readable safetensors "
                         f"file: {e}") from e

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, part = key.removeprefix(KEY_PREFIX).rpartition(".lora_")
        if not key.startswith(KEY_PREFIX) or part not in ("A.weight", "B.weight"):
            raise ValueError(f"adapter {name!r}: unexpected tensor {key!r} (only lora_A/lora_B "
                             "weights of linear layers are supported)")
        pairs.setdefault(stem, {})[part[0]] = tensor
    if not pairs:
        raise ValueError(f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")

    output_embeddings = model.get_output_embeddings()
    weights = {}
    for module_path, ab in sorted(pairs.items()):
        missing = sorted({"A", "B"} - set(ab))
        if missing:
            raise ValueError(f"adapter {name!r}: {module_path} lacks lora_{missing[0]}")
        try:
            base = _unwrapped(model.get_submodule(module_path))
        except AttributeError:
            raise ValueError(f"adapter {name!r}: the base model has no module {module_path!r} "
                             "(adapter made for another model?)") from None
        if base is output_embeddings:
            raise ValueError(f"adapter {name!r}: LoRA on the LM head is not supported")
        try:
            in_features, out_features = linear_features(base)
        except ValueError as e:
            raise ValueError(f"adapter {name!r}: {module_path}: {e}") from None
        A, B = ab["A"], ab["B"]
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_path), rank)
        a = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_path), alpha)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] == 0 or A.shape[0] != B.shape[1]:
            raise ValueError(f"adapter {name!r}: {module_path}: bad LoRA shapes A "
                             f"{tuple(A.shape)}, B {tuple(B.shape)}")
        if A.shape[0] != r:
            raise ValueError(f"adapter {name!r}: {module_path}: rank {A.shape[0]} in the "
                             f"weights, {r} in the config")
        if A.shape[1] != in_features or B.shape[0] != out_features:
            raise ValueError(f"adapter {name!r}: {module_path}: A {tuple(A.shape)} / B "
                             f"{tuple(B.shape)} do not fit the base layer ({in_features} -> "
                             f"{out_features})")
        scaling = a / math.sqrt(r) if config.get("use_rslora") else a / r
        weights[module_path] = (A.contiguous(), B.contiguous(), float(scaling))
    num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    targets = config.get("target_modules") or []
    return LoRAAdapter(name, os.path.abspath(path), rank, alpha,
                       [targets] if isinstance(targets, str) else sorted(targets),
                       weights, num_bytes)


@dataclass
class AdapterSlots:
    """The loaded adapters of one model: all in host memory, up to ``num_slots`` on the device.

    The wrapping is permanent: a module stays a ``BatchedLoRALinear`` after the adapters
    that targeted it are unloaded (it then computes exactly its base layer).
    """
    model: nn.Module
    num_slots: int = 4
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    adapters: dict[str, LoRAAdapter] = field(default_factory=dict)       # name -> adapter
    layers: dict[str, BatchedLoRALinear] = field(default_factory=dict)   # module path -> wrapper
    slot_names: list[str | None] = field(default_factory=list)          # slot -> adapter name
    _tick: int = 0

    def __post_init__(self):
        if self.num_slots <= 0:
            raise ValueError("adapter_slots must be positive")
        self.slot_names = [None] * self.num_slots

    def load(self, name: str, path: str) -> dict:
        """Read, validate and keep adapter ``name`` in host memory; wrap the layers it targets."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already loaded (unload it first)")
        adapter = read_adapter(name, path, self.model)
        for module_path in adapter.weights:
            if module_path not in self.layers:
                parent_path, _, attr = module_path.rpartition(".")
                parent = self.model.get_submodule(parent_path)
                wrapper = BatchedLoRALinear(getattr(parent, attr), self.num_slots)
                setattr(parent, attr, wrapper)
                self.layers[module_path] = wrapper
        self.adapters[name] = adapter
        return adapter.info()

    def unload(self, name: str) -> None:
        """Forget adapter ``name`` (KeyError if unknown), freeing its slot."""
        adapter = self.adapters.pop(name)
        if adapter.slot is not None:
            self._evict(adapter)

    def listing(self) -> list[dict]:
        return [{**a.info(), "where": "host" if a.slot is None else "device", "slot": a.slot,
                 "last_used": a.last_used} for a in self.adapters.values()]

    def num_bytes(self) -> dict:
        """Host bytes of all loaded adapters; device bytes of the slot stacks (rank-padded)."""
        return {"host": sum(a.num_bytes for a in self.adapters.values()),
                "device": sum(w.device_bytes() for w in self.layers.values())}

    def prepare(self, chunks: Sequence[SeqChunk]) -> LoRABatch | None:
        """Make every adapter the chunks name resident and return the per-token slot layout
        (None when no chunk uses an adapter). KeyError for an unknown name; ValueError when
        the plan names more distinct adapters than there are slots."""
        names = list(dict.fromkeys(c.adapter for c in chunks if c.adapter is not None))
        if not names:
            return None
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}: load_adapter() first")
        if len(names) > self.num_slots:
            raise ValueError(f"plan uses {len(names)} distinct adapters but there are only "
                             f"{self.num_slots} adapter slots")
        now = time.time()
        for name in names:
            adapter = self.adapters[name]
            if adapter.slot is None:
                self._install(adapter, self._free_slot(keep=set(names)))
            self._tick += 1
            adapter.use_tick, adapter.last_used = self._tick, now
        spans = [(-1 if c.adapter is None else self.adapters[c.adapter].slot, c.num_tokens)
                 for c in chunks]
        return LoRABatch.build(spans, self.device)

    def _free_slot(self, keep: set[str]) -> int:
        """An empty slot, else the slot of the least recently used adapter not in ``keep``."""
        if None in self.slot_names:
            return self.slot_names.index(None)
        victims = [self.adapters[n] for n in self.slot_names if n not in keep]
        assert victims, "more adapters in the plan than slots"
        victim = min(victims, key=lambda a: a.use_tick)
        slot = victim.slot
        self._evict(victim)
        return slot

    def _install(self, adapter: LoRAAdapter, slot: int) -> None:
        assert self.slot_names[slot] is None
        for module_path, wrapper in self.layers.items():
            if module_path in adapter.weights:
                wrapper.set_slot(slot, *adapter.weights[module_path])
            else:
                wrapper.clear_slot(slot)
        self.slot_names[slot], adapter.slot = adapter.name, slot

    def _evict(self, adapter: LoRAAdapter) -> None:
        for module_path in adapter.weights:
            self.layers[module_path].clear_slot(adapter.slot)
        self.slot_names[adapter.slot], adapter.slot = None, None
