"""Where a spawn goes: the kernel where it costs least.

In order: a pinned kernel (``spawn(node=…)``); else among the kernels that take new processes,
those with the model already on the device; among them the one whose cache most likely holds
the longest prefix of the prompt (ties: the least loaded); with no prefix cached anywhere, the
one whose cache holds least, then the least loaded. A balance
threshold keeps one hot prefix from piling every process on one kernel: when the most loaded
candidate has more than ``balance_abs`` processes above the least loaded and more than
``balance_rel`` times its load, the least loaded wins outright (SGLang's router does the same).

The prefix index is approximate, like SGLang's cache-aware router and Ray Serve's prefix-aware
one: it remembers, per kernel, hashes of the prompt prefixes the front sent there, at every
``CHUNK`` tokens or characters, in an LRU of bounded size (a kernel's cache forgets too), and is
cleared when that kernel restarts. It never asks a kernel; a wrong guess costs only a cache miss.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

CHUNK = 16                 # characters of text, or token ids, per indexed prefix step
CAPACITY = 200_000         # prefix hashes remembered per kernel


def prompt_key(args: dict) -> tuple | str:
    """What a spawn's prefix is matched on: its token ids, or its text (chat messages joined)."""
    ids = args.get("prompt_ids")
    if isinstance(ids, list):
        return tuple(ids)
    msgs = args.get("messages")
    if isinstance(msgs, list):
        return "".join(f"\x00{m.get('role')}\x01{m.get('content')}" for m in msgs if isinstance(m, dict))
    prompt = args.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def _prefix_hashes(key, model: str) -> list[int]:
    """A chained hash per whole chunk: the i-th names the first (i+1)*CHUNK items (and the model)."""
    out, h = [], hash(model)
    for start in range(0, len(key) - CHUNK + 1, CHUNK):
        h = hash((h, key[start:start + CHUNK]))
        out.append(h)
    return out


class PrefixIndex:
    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self.kernels: dict[int, OrderedDict] = {}

    def insert(self, kernel: int, key, model: str) -> None:
        lru = self.kernels.setdefault(kernel, OrderedDict())
        for h in _prefix_hashes(key, model):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.capacity:
            lru.popitem(last=False)

    def match(self, kernel: int, key, model: str) -> int:
        """How many leading tokens or characters of ``key`` ``kernel`` likely has cached."""
        lru = self.kernels.get(kernel)
        if not lru:
            return 0
        n = 0
        for h in _prefix_hashes(key, model):
            if h not in lru:
                break
            n += CHUNK
        return n

    def size(self, kernel: int) -> int:
        return len(self.kernels.get(kernel, ()))

    def forget(self, kernel: int) -> None:
        self.kernels.pop(kernel, None)


@dataclass
class Candidate:
    kernel: int
    load: int                  # live processes
    resident: bool             # the model is on the device there


@dataclass
class Policy:
    mode: str = "prefix"       # prefix | round-robin | least-loaded (the last two for comparison)
    balance_abs: int = 8
    balance_rel: float = 1.5


def choose(cands: list[Candidate], index: PrefixIndex, key, model: str, policy: Policy,
           turn: int = 0) -> tuple[int, dict]:
    """The kernel for a spawn and why (``pinfo`` shows the reason)."""
    assert cands, "no kernel takes processes"
    if policy.mode == "round-robin":
        c = sorted(cands, key=lambda c: c.kernel)[turn % len(cands)]
        return c.kernel, {"reason": "round-robin"}
    least = min(cands, key=lambda c: (c.load, c.kernel))
    if policy.mode == "least-loaded":
        return least.kernel, {"reason": "least loaded", "load": least.load}
    resident = [c for c in cands if c.resident] or cands
    best = max(resident, key=lambda c: (index.match(c.kernel, key, model), -c.load, -c.kernel))
    matched = index.match(best.kernel, key, model)
    top = max(c.load for c in cands)
    if top - least.load > policy.balance_abs and top > policy.balance_rel * least.load and best.load == top:
        return least.kernel, {"reason": "balance", "load": least.load, "prefix_elsewhere": matched}
    if matched:
        return best.kernel, {"reason": "prefix", "prefix": matched, "load": best.load}
    # Nothing cached anywhere: the kernel whose cache holds least (SGLang's choice), so new
    # prefixes spread and each kernel's cache keeps its own share of them; then the least loaded.
    best = min(resident, key=lambda c: (index.size(c.kernel), c.load, c.kernel))
    reason = "model resident" if best.resident and len(resident) < len(cands) else "smallest cache"
    return best.kernel, {"reason": reason, "load": best.load}


def describe(value: Any) -> str:
    """A placement reason as one short phrase (``ps``/``pinfo`` in the shell)."""
    if not isinstance(value, dict) or "reason" not in value:
        return ""
    extra = f" {value['prefix']}" if "prefix" in value else ""
    return f"{value['reason']}{extra}"
