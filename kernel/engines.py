"""Booting the device side: the device driver, the model manager, the boot model, and how each
model that comes onto the device becomes an engine (its driver, a KV pool sized for it, and a
scheduler over the kernel's process table).
"""
from __future__ import annotations

import logging
import math

from llmos.kernel.models import Engine, ModelEntry, ModelManager
from llmos.kernel.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger("llmos.kernel")
DEFAULT_NAME = "llmos-tiny-random"


def boot(cfg, table: dict, shares) -> tuple[object, ModelManager, ModelEntry]:
    """Detect the device and load the boot model on it (pinned); SystemExit if it cannot."""
    from llmos.drivers.default_model import ensure_default_model
    from llmos.drivers.device import detect
    device = detect(cfg.device)

    def make_engine(entry: ModelEntry, driver, free_bytes: int) -> Engine:
        return _make_engine(cfg, device, table, shares, entry, driver, free_bytes)
    models = ModelManager(cfg, device, make_engine, park=None)
    builtin = cfg.model == "default"
    name = DEFAULT_NAME if builtin else cfg.model
    path = ensure_default_model(cfg.state_dir) if builtin else cfg.model
    entry = models.entries.setdefault(name, ModelEntry(name, path, random_weights=builtin))
    error = models.load_now(entry)
    if error is not None:
        raise SystemExit(f"llmos: {error.message}")
    return device, models, entry


def _make_engine(cfg, device, table, shares, entry: ModelEntry, driver, free_bytes: int) -> Engine:
    per_block = driver.kv_bytes_per_block()
    # Never more than every sequence at full context could use; on CPU that cap decides.
    state = driver.state_blocks                   # recurrent-state blocks per process (hybrid models)
    cap = cfg.max_num_seqs * driver.blocks_for(driver.max_model_len)
    num_blocks = cfg.kv_blocks or max(16 + state, min(cap, int(free_bytes * cfg.kv_fraction) // per_block))
    num_host = cfg.host_kv_blocks if cfg.host_kv_blocks is not None else num_blocks
    # A lone process must always fit in the pool, so the context window is at most the pool.
    if driver.token_blocks:
        max_len = min(driver.max_model_len, (num_blocks - state) * cfg.block_size)
    else:                                         # a process holds its state blocks only, however long
        max_len = driver.max_model_len if num_blocks >= state else 0
    if max_len < cfg.block_size:
        raise ValueError(f"{entry.name}: {num_blocks} KV blocks cannot hold its {state} blocks of recurrent state "
                         f"and a sequence")
    driver.allocate_kv(num_blocks, num_host)
    sched = Scheduler(SchedulerConfig(
        num_blocks=num_blocks, num_host_blocks=num_host, block_size=cfg.block_size,
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=min(cfg.max_num_batched_tokens, driver.max_packed_tokens or cfg.max_num_batched_tokens),
        max_model_len=max_len, preempt_mode=cfg.preempt_mode,
        eos_token_ids=frozenset(driver.eos_token_ids), max_adapters_per_step=cfg.adapter_slots,
        token_blocks=driver.token_blocks),
        table=table, shares=shares, kv_variant=driver.rope.variant, state_blocks=state)
    log.info("model %s on %s: %d KV blocks (%d bytes each), %d host blocks, attention backend %s",
             entry.name, device.name, num_blocks, per_block, num_host, driver.backend.name)
    return Engine(entry.name, driver, sched, max_len, num_blocks * per_block)
