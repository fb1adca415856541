"""Weights residency: models on the device, offloaded to host memory, or on disk.

Each model resident on the device is an ``Engine``: its driver (weights + its own paged KV
pool, sized at load) and its scheduler (its processes). All engines share one device budget.
Loading a model a process needs is a page fault: the loader thread reads it (from its host copy
when there is one, else from disk) while the kernel loop keeps stepping the other engines;
``poll_loads`` hands finished loads back to the loop. To make room, idle models are evicted
least-recently-used — pinned models and models with live processes are never taken — to host
memory while the host budget allows, else dropped. When nothing can make it fit: ``ENOMEM``
with the numbers.

On a CPU-only machine device and host memory are the same RAM; the budgets are still kept
separately, so the policy behaves as it would on a GPU.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from llmos.kernel import audit
from llmos.kernel.leases import LeaseTable
from llmos.kernel.security import ROOT_UID
from llmos.syscalls.errors import SyscallError

log = logging.getLogger("llmos.kernel")
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


class Where(Enum):
    """Where a model's weights are."""
    DEVICE = "device"            # resident: an engine with a KV pool
    HOST = "host"                # offloaded to host memory (a warm reload)
    DISK = "disk"                # only its files


@dataclass
class Engine:
    """A model on the device: driver (weights + KV pool) and scheduler (its processes' run
    queue). Whether it has work is the scheduler's to say (``sched.has_work()``)."""
    name: str
    driver: object
    sched: object
    max_model_len: int
    kv_bytes: int


@dataclass
class AdapterRecord:
    """Who loaded a LoRA adapter on a model, and what they call it."""
    owner_uid: int
    label: str                         # its file-store path (an export), or its host directory


@dataclass(eq=False)
class ModelEntry:
    name: str                          # what users call it: an alias or the canonical path / hub id
    path: str
    owner_uid: int = ROOT_UID          # who first named it; root's (boot model, aliases) are shared
    random_weights: bool = False
    where: Where = Where.DISK
    engine: Engine | None = None       # when on the device
    host_driver: object | None = None  # when offloaded: weights in host memory, no KV pool
    weight_bytes: int = 0              # estimated until loaded, then exact
    pinned: bool = False
    last_used: float = 0.0
    nice: int = 0                      # priority of its latest user: less important models go first
    loading: bool = False
    tokenizer: object | None = None    # loaded on first mention, before the weights
    config: object | None = None
    adapter_records: dict[str, AdapterRecord] = field(default_factory=dict)   # adapter name -> record


@dataclass
class LoadDone:
    entry: ModelEntry
    driver: object | None
    error: SyscallError | None = None


class ModelManager:
    def __init__(self, cfg, device, make_engine, park):
        self.cfg = cfg
        self.device = device
        self.make_engine = make_engine          # (entry, driver, kv_budget_bytes) -> Engine
        self.park = park                        # (entry, nice) -> bool: its processes stepped aside
        self.entries: dict[str, ModelEntry] = {}
        self.done: queue.SimpleQueue[LoadDone] = queue.SimpleQueue()
        free = device.free_bytes()
        self.device_budget = cfg.device_budget or int(free * 0.9)
        self.host_budget = cfg.host_budget if cfg.host_budget is not None else int(_host_available() * 0.5)
        self.reserve = int(self.device_budget * cfg.reserve_fraction)
        self.leases = LeaseTable()             # device memory lent to services (the tuner)
        for alias, path in cfg.aliases.items():
            self.entries[alias] = ModelEntry(alias, path)

    # -- names --------------------------------------------------------------------------------
    def resolve(self, name: str, owner_uid: int = ROOT_UID) -> ModelEntry:
        """The entry for an alias, a known name, or a local path or hub id (a new entry, owned by
        ``owner_uid``); ``ENOENT`` otherwise. Local paths are canonical: every spelling of one
        directory is one entry. Touches the filesystem: callers check the caller may (objects)."""
        entry = self.entries.get(name)
        if entry is None:
            key = canonical(name)
            entry = self.entries.get(key) or next(
                (e for e in self.entries.values() if canonical(e.path) == key), None)
        if entry is None:
            hub_id = is_hub_id(name)
            if not Path(key).is_dir() and not hub_id:
                known = ", ".join(sorted(self.entries)) or "none"
                raise SyscallError("ENOENT", f"unknown model {name!r} (known: {known}; or give a model "
                                             f"directory or hub id)")
            entry = ModelEntry(key, key, owner_uid=owner_uid)
            try:
                self._read_meta(entry)
            except SyscallError as err:
                if hub_id:     # the loop never waits on the network: only the local HF cache here
                    raise SyscallError("ENOENT", f"model {name!r} is neither a local directory nor in the "
                                                 f"local Hugging Face cache (download it first, or boot "
                                                 f"with --model {name}): {err.message}"[:400])
                raise
            self.entries[key] = entry
        if entry.config is None:
            self._read_meta(entry)
        return entry

    def _read_meta(self, entry: ModelEntry, local_only: bool = True) -> None:
        """Tokenizer, config and weight size: enough to check a spawn before the weights load.
        Runs on the loop's thread, so by default it reads local files only (never the network)."""
        from transformers import AutoConfig, AutoTokenizer
        try:
            config = AutoConfig.from_pretrained(entry.path, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(entry.path, local_files_only=local_only)
        except (OSError, ValueError, KeyError) as exc:
            raise SyscallError("EINVAL", f"model {entry.name!r} at {entry.path}: {exc}".splitlines()[0][:300])
        try:
            files = _local_dir(entry.path, local_only)
        except Exception as exc:          # hub errors come in many types
            raise SyscallError("ENOENT", f"model {entry.name!r}: weights not available: {exc}".splitlines()[0][:300])
        weight_bytes = _weight_bytes(files, self._dtype_bytes())   # all or nothing: a later
        entry.config, entry.tokenizer, entry.weight_bytes = config, tokenizer, weight_bytes  # call retries

    def _dtype_bytes(self) -> int:
        if self.cfg.dtype:
            return _DTYPE_BYTES.get(self.cfg.dtype, 4)
        return 2 if self.device.kind == "cuda" else 4

    # -- faults and loads ---------------------------------------------------------------------
    def fault(self, entry: ModelEntry, pin: bool = False, nice: int = 0) -> bool:
        """True if ``entry`` is on the device; else start loading it (once) and return False.
        ``nice`` is the priority of who needs it: busy models whose processes are all less
        important may be taken for it."""
        entry.last_used = time.monotonic()
        entry.pinned = entry.pinned or pin
        if entry.where is Where.DEVICE:
            return True
        if not entry.loading:
            self.check_fits(entry)
            if self.make_room(entry, nice):
                entry.loading = True
                threading.Thread(target=self._load, args=(entry,), name=f"llmos-load-{entry.name}",
                                 daemon=True).start()
        return False

    def load_now(self, entry: ModelEntry) -> SyscallError | None:
        """Boot: read (and, for a hub id, fetch) the model, load it on this thread and pin it —
        the kernel starts with it. Returns the error, if any."""
        try:
            self._read_meta(entry, local_only=False)      # only boot may use the network
            self.check_fits(entry)
        except SyscallError as err:
            return err
        entry.loading, entry.pinned = True, True
        self._load(entry)
        (done,) = self.poll_loads()
        return done.error

    def retry_waiting(self, waiting: dict[ModelEntry, int]) -> None:
        """Models that could not fit earlier try again (called when processes end), each with
        the priority of its most important waiting process."""
        for entry, nice in waiting.items():
            if not entry.loading and entry.where is not Where.DEVICE:
                self.fault(entry, nice=nice)

    def _load(self, entry: ModelEntry) -> None:
        from llmos.drivers.model import ModelDriver
        try:
            if entry.host_driver is not None:
                driver = entry.host_driver
                driver.to_device()                               # warm: from host memory
            else:
                driver = ModelDriver(entry.path, self.device, self.cfg.dtype, self.cfg.block_size,
                                     name=entry.name, backend=self.attention_backend(),
                                     adapter_slots=self.cfg.adapter_slots)
            self.done.put(LoadDone(entry, driver))
        except Exception as exc:      # a corrupt checkpoint must not take the kernel down
            log.error("loading %s failed: %s", entry.name, exc)
            self.done.put(LoadDone(entry, None, SyscallError("EINVAL", f"cannot load model {entry.name!r}: "
                                                                       f"{type(exc).__name__}: {exc}"[:400])))

    def attention_backend(self):
        """The paged-attention backend for new drivers (``--attention-backend``)."""
        from llmos.drivers import attention, triton_attention
        choice = self.cfg.attention_backend
        if choice == "auto":
            choice = "triton" if self.device.kind == "cuda" and triton_attention.available() else "torch"
        if choice == "triton":
            if not triton_attention.available():
                raise RuntimeError("--attention-backend triton: triton is not installed or has no GPU "
                                   "(set TRITON_INTERPRET=1 to run its kernels on the CPU, slowly)")
            return triton_attention.TritonBackend()
        return attention.TorchBackend()

    def poll_loads(self) -> list[LoadDone]:
        """Finished loads, turned into engines (on the loop's thread)."""
        finished = []
        while True:
            try:
                d = self.done.get_nowait()
            except queue.Empty:
                return finished
            e = d.entry
            e.loading = False
            if d.error is None:
                e.weight_bytes = _module_bytes(d.driver.model)
                e.engine = self.make_engine(e, d.driver, self.free_bytes())
                e.host_driver, e.where = None, Where.DEVICE
                e.last_used = time.monotonic()
                log.info("model %s on the device (%d weight bytes, %d KV bytes)", e.name, e.weight_bytes,
                         e.engine.kv_bytes)
                audit.event("model_load", model=e.name, owner_uid=e.owner_uid, weight_bytes=e.weight_bytes)
            finished.append(d)

    # -- room ---------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        return sum(e.weight_bytes + e.engine.kv_bytes + e.engine.driver.adapter_bytes()["device"]
                   for e in self.entries.values() if e.where is Where.DEVICE) \
            + sum(e.weight_bytes for e in self.entries.values() if e.loading) + self.leases.used_bytes()

    def free_bytes(self) -> int:
        return self.device_budget - self.reserve - self.used_bytes()

    def min_kv_bytes(self, entry: ModelEntry) -> int:
        """The least KV pool worth having: one full context window."""
        text = entry.config.get_text_config()      # an estimate before load (Mamba has no heads)
        layers = getattr(text, "num_hidden_layers", None) or 1
        heads = getattr(text, "num_attention_heads", None) or 1
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or (getattr(text, "hidden_size", None) or 64) // heads
        ctx = min(getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", 2048), 4096)
        blocks = self.cfg.kv_blocks or math.ceil(ctx / self.cfg.block_size)
        return blocks * self.cfg.block_size * layers * 2 * kv_heads * head_dim * self._dtype_bytes()

    def pinned_bytes(self, besides: ModelEntry | None = None) -> int:
        """Device bytes of pinned models (never evicted), ``besides`` excluded."""
        return sum(e.weight_bytes + e.engine.kv_bytes for e in self.entries.values()
                   if e.where is Where.DEVICE and e.pinned and e is not besides)

    def check_fits(self, entry: ModelEntry) -> None:
        need = entry.weight_bytes + self.min_kv_bytes(entry)
        pinned = self.pinned_bytes(besides=entry)
        room = self.device_budget - self.reserve - pinned
        if need > room:
            raise SyscallError("ENOMEM", f"model {entry.name!r} needs {need} bytes (weights {entry.weight_bytes} "
                                         f"+ minimal KV); the device budget is {self.device_budget} "
                                         f"(reserve {self.reserve}, pinned models {pinned})")

    def make_room(self, entry: ModelEntry, nice: int = 0) -> bool:
        """Evict models until ``entry`` fits: idle ones first — those last used by the least
        important processes, then least recently used — then busy ones whose processes are all
        less important than ``nice`` (they are preempted for recompute and wait for their
        model, like any preemption). False if it must wait."""
        need = entry.weight_bytes + self.min_kv_bytes(entry)
        self.make_room_bytes(need, besides=entry)
        busy = sorted((e for e in self.entries.values() if e.where is Where.DEVICE and not e.pinned
                       and e is not entry and _in_use(e)), key=_eviction_order)
        short = need - self.free_bytes()
        if short > 0 and self.leases.revoke_for(nice, short) >= short:
            return False            # leases are being given back: the load waits for them
        if self.free_bytes() < need and self.free_bytes() + sum(
                e.weight_bytes + e.engine.kv_bytes for e in busy) >= need:
            for e in busy:
                if self.free_bytes() >= need:
                    break
                if self.park(e, nice):
                    self.evict(e)
        return self.free_bytes() >= need

    def make_room_bytes(self, need: int, besides: ModelEntry | None = None) -> bool:
        """Evict idle models (not ``besides``) until ``need`` bytes are free — those last used by
        the least important processes first, then least recently used; True if that did it."""
        idle = sorted((e for e in self.entries.values() if e.where is Where.DEVICE and not e.pinned
                       and e is not besides and not _in_use(e)), key=_eviction_order)
        while self.free_bytes() < need and idle:
            self.evict(idle.pop(0))
        return self.free_bytes() >= need

    def evict(self, entry: ModelEntry) -> None:
        """Off the device: to host memory if the host budget allows, else dropped (disk)."""
        driver = entry.engine.driver
        host_used = sum(e.weight_bytes for e in self.entries.values() if e.where is Where.HOST)
        if host_used + entry.weight_bytes <= self.host_budget:
            driver.to_host()                                  # its KV pool goes with it
            entry.host_driver, entry.where = driver, Where.HOST
        else:
            entry.host_driver, entry.where = None, Where.DISK
        entry.engine = None
        log.info("model %s evicted to %s", entry.name, entry.where.value)

    def unload(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is None or entry.where is Where.DISK and not entry.loading:
            raise SyscallError("ENOENT", f"model {name!r} is not loaded")
        if entry.loading or (entry.engine is not None and _in_use(entry)):
            raise SyscallError("EBUSY", f"model {name!r} is in use or loading")
        if entry.where is Where.DEVICE:
            self.evict(entry)
        entry.host_driver, entry.where, entry.pinned = None, Where.DISK, False

    def engines(self) -> list[Engine]:
        return [e.engine for e in self.entries.values() if e.engine is not None]


def is_hub_id(name: str) -> bool:
    """``org/model`` that is not a local path."""
    return "/" in name and not name.startswith((".", "/", "~")) and not Path(name).exists()


def canonical(name: str) -> str:
    """A local path made absolute with links, ``.`` and ``..`` resolved; a hub id as it is."""
    return name if is_hub_id(name) else os.path.realpath(os.path.expanduser(name))


def _eviction_order(e: ModelEntry) -> tuple:
    return -e.nice, e.last_used


def _in_use(entry: ModelEntry) -> bool:
    """Any process (even an unreaped ZOMBIE) still belongs to this model's scheduler."""
    return entry.engine is not None and bool(entry.engine.sched.pids)


def _module_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _local_dir(path: str, local_only: bool) -> str:
    """Where a model's files are: its directory, or its snapshot in the HF cache (fetched only
    when ``local_only`` is False, i.e. at boot)."""
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download
    return snapshot_download(path, local_files_only=local_only)


def _weight_bytes(path: str, dtype_bytes: int) -> int:
    """Parameter bytes at the load dtype, from the safetensors headers (no weights read)."""
    from safetensors import safe_open
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise SyscallError("EINVAL", f"no .safetensors weights in {path}")
    total = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    total += math.prod(st.get_slice(key).get_shape()) * dtype_bytes
        except Exception as exc:
            raise SyscallError("EINVAL", f"corrupt weights file {f.name}: {exc}"[:300])
    return total


def _host_available() -> int:
    import psutil
    return psutil.virtual_memory().available
