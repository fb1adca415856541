"""Many kernels' answers as one: what the front replies to a call it asked every kernel.

``ps`` and ``mm_leases`` list every kernel's rows (pids made global, each row naming its kernel
and node); ``models`` has one row per model, naming the kernels that hold it and the best place
its weights are; ``shares`` one row per user, sums across kernels; counters (``stat``,
``meminfo``, ``free``, ``devinfo``) are summed key by key, with each kernel's own answer under
``kernels``. ``model_load``/``model_unload`` answer with the first kernel's result and the list
of kernels that did it; any call fails only if it failed on every kernel.
"""
from __future__ import annotations

from typing import Any

from llmos.cluster.pids import translate
from llmos.syscalls.errors import SyscallError

_WHERE_RANK = {"device": 0, "host": 1, "disk": 2}
_NOT_SUMMED = {"block_size", "bytes_per_block", "utilization", "uptime_s", "temperature_c", "max_frame",
               "share", "fraction", "kind", "name", "interval_s", "session_timeout"}


def finish(front, fwd, parts: dict[int, dict]) -> None:
    oks = {k: env.get("result") for k, env in sorted(parts.items()) if env.get("ok")}
    if not oks:
        return front.pass_on(fwd, next(iter(parts.values())))
    name = fwd.name
    if name in ("model_load", "model_unload"):
        first = next(iter(oks.values()))
        return front.answer(fwd, {**first, "kernels": list(oks)} if isinstance(first, dict) else first)
    if name == "ps":
        rows = [r for k, res in oks.items() for r in translate(front.pids, "ps", k, res, front.members[k].node)]
        return front.answer(fwd, sorted(rows, key=lambda r: r.get("pid", 0) if isinstance(r, dict) else 0))
    if name == "mm_leases":
        return front.answer(fwd, [dict(r, kernel=k) for k, res in oks.items() for r in res if isinstance(r, dict)])
    if name == "models":
        return front.answer(fwd, _models(oks))
    if name == "shares":
        return front.answer(fwd, _shares(oks))
    merged = _sum([r for r in oks.values() if isinstance(r, dict)])
    if "blocks_total" in merged and merged.get("blocks_total"):
        merged["utilization"] = merged.get("blocks_used", 0) / merged["blocks_total"]
    merged["kernels"] = {str(k): r for k, r in oks.items()}
    front.answer(fwd, merged)


def _models(oks: dict[int, Any]) -> list[dict]:
    by_name: dict[str, dict] = {}
    for k, rows in oks.items():
        for r in rows if isinstance(rows, list) else ():
            have = by_name.get(r.get("name"))
            if have is None:
                by_name[r.get("name")] = dict(r, kernels=[k])
                continue
            have["kernels"].append(k)
            have["processes"] = (have.get("processes") or 0) + (r.get("processes") or 0)
            if _WHERE_RANK.get(r.get("where"), 9) < _WHERE_RANK.get(have.get("where"), 9):
                have["where"] = r.get("where")
    return list(by_name.values())


def _shares(oks: dict[int, Any]) -> list[dict]:
    by_uid: dict[Any, dict] = {}
    for rows in oks.values():
        for r in rows if isinstance(rows, list) else ():
            have = by_uid.get(r.get("uid"))
            if have is None:
                by_uid[r.get("uid")] = dict(r)
                continue
            for key in ("tokens_served", "procs", "kv_blocks"):
                have[key] = (have.get(key) or 0) + (r.get(key) or 0)
    return list(by_uid.values())


def _sum(dicts: list[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        for key, v in d.items():
            have = out.get(key)
            if key not in out:
                out[key] = _sum([v]) if isinstance(v, dict) else v
            elif isinstance(v, dict) and isinstance(have, dict):
                out[key] = _sum([have, v])
            elif _is_num(v) and _is_num(have) and key not in _NOT_SUMMED:
                out[key] = have + v
            elif key == "uptime_s" and _is_num(v) and _is_num(have):
                out[key] = max(have, v)
    return out


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def answer_kept(front, fwd, kept: dict) -> None:
    """A call about a process that ended away from any kernel now up: its result, kept at the
    front when its kernel was drained, or the error that ended it (EHOSTDOWN)."""
    if "error" in kept:
        errno, message = kept["error"]
        return front.answer(fwd, err=SyscallError(errno, message))
    result = kept["result"]
    if fwd.name == "wait":
        front.kept.pop(fwd.req.args.get("pid"), None)
        return front.answer(fwd, result)
    if fwd.name == "read":
        a = fwd.req.args
        since = a.get("since") if isinstance(a.get("since"), int) else 0
        since_text = a.get("since_text") if isinstance(a.get("since_text"), int) else 0
        return front.answer(fwd, {"text": (result.get("text") or "")[since_text:],
                                  "token_ids": list(result.get("token_ids") or [])[since:],
                                  "finish_reason": result.get("finish_reason"), "events": result.get("events", [])})
    if fwd.name == "pinfo":
        return front.answer(fwd, {"pid": result.get("pid"), "state": "ZOMBIE", "kept_at_front": True,
                                  "finish_reason": result.get("finish_reason")})
    front.answer(fwd, err=SyscallError("ESRCH", f"process {result.get('pid')} has exited (reap it with wait)"))
