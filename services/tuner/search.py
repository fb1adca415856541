"""Hyperparameter search: what to try (random sampling of a space) and how long to train each
try (successive halving).

A space maps a training parameter to its candidates: a list of values (``[4, 8, 16]``) or a
range ``{"min": 1e-4, "max": 1e-1, "log": true}`` (``"int": true`` for integers).

* ``random``: ``trials`` configurations, each trained for its whole budget.
* ``halving`` (successive halving): ``trials`` configurations start; after each rung only the
  best ``1/eta`` by validation loss go on, and every rung trains its survivors ``eta`` times
  longer (continuing from their checkpoints, not from scratch); the last rung trains the
  survivors to their full budget. Most of the compute goes to the promising ones.
"""
from __future__ import annotations

import math
import random

from llmos.syscalls.errors import SyscallError

SEARCHABLE = ("lr", "rank", "alpha", "dropout", "epochs", "batch_size", "weight_decay", "max_steps")
STRATEGIES = ("random", "halving")
MAX_TRIALS = 64


def _bad(why: str) -> SyscallError:
    return SyscallError("EINVAL", f"search: {why}")


def check(search: dict) -> dict:
    """A validated copy of ``search``: {space, trials, strategy, eta, seed}."""
    if not isinstance(search, dict):
        raise _bad("must be a map {space, trials, strategy}")
    unknown = set(search) - {"space", "trials", "strategy", "eta", "seed"}
    if unknown:
        raise _bad(f"unknown keys {sorted(unknown)}")
    space = search.get("space")
    if not isinstance(space, dict) or not space:
        raise _bad("the space is empty: give e.g. {\"lr\": [1e-3, 1e-2], \"rank\": [4, 8]}")
    for name, dim in space.items():
        if name not in SEARCHABLE:
            raise _bad(f"cannot search {name!r}; searchable: {list(SEARCHABLE)}")
        if isinstance(dim, list):
            if not dim:
                raise _bad(f"{name}: no candidates")
        elif isinstance(dim, dict):
            lo, hi = dim.get("min"), dim.get("max")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or lo > hi:
                raise _bad(f"{name}: a range needs numbers min <= max")
            if dim.get("log") and lo <= 0:
                raise _bad(f"{name}: a log range needs min > 0")
        else:
            raise _bad(f"{name}: give a list of values or {{min, max[, log, int]}}")
    trials = search.get("trials", 4)
    if not isinstance(trials, int) or isinstance(trials, bool) or not 1 <= trials <= MAX_TRIALS:
        raise _bad(f"trials must be an integer in [1, {MAX_TRIALS}]")
    strategy = search.get("strategy", "random")
    if strategy not in STRATEGIES:
        raise _bad(f"strategy must be one of {list(STRATEGIES)}")
    eta = search.get("eta", 3)
    if not isinstance(eta, int) or isinstance(eta, bool) or eta < 2:
        raise _bad("eta must be an integer >= 2")
    seed = search.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _bad("seed must be an integer")
    return {"space": space, "trials": trials, "strategy": strategy, "eta": eta, "seed": seed}


def _draw(rng: random.Random, dim):
    if isinstance(dim, list):
        return rng.choice(dim)
    lo, hi = dim["min"], dim["max"]
    x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if dim.get("log") else rng.uniform(lo, hi)
    return int(round(x)) if dim.get("int") else x


def sample(search: dict, base: dict) -> list[dict]:
    """``trials`` parameter sets: ``base`` with each searched parameter drawn (seeded). Distinct
    where the space allows it."""
    rng = random.Random(search["seed"])
    out, seen = [], set()
    for _ in range(search["trials"] * 20):
        params = {**base, **{k: _draw(rng, dim) for k, dim in sorted(search["space"].items())}}
        key = repr(sorted(params.items(), key=lambda kv: kv[0]))
        if key not in seen:
            seen.add(key)
            out.append(params)
        if len(out) == search["trials"]:
            break
    return out


def rungs(search: dict) -> list[tuple[int, float]]:
    """``[(survivors, fraction of the full budget), ...]`` for each rung, first to last."""
    n = search["trials"]
    if search["strategy"] == "random" or n == 1:
        return [(n, 1.0)]
    eta = search["eta"]
    s = max(1, int(math.floor(math.log(n, eta) + 1e-9)))
    return [(max(1, math.ceil(n / eta ** i)), float(eta) ** (i - s)) for i in range(s + 1)]
