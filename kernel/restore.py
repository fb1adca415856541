"""Bringing journaled processes back at boot (``kernel.journal`` records them).

Each process comes back in the state it was in, with every token it had: runnable ones are
queued READY on their model's scheduler (its KV recomputed from its tokens; forks that share a
prefix share its blocks again through the prefix cache), an interactive one between turns
waits for input, a STOPPED one stays STOPPED until CONT, a ZOMBIE keeps its result until it is
reaped. A process whose model is not on the device waits for it like a page fault. A process
that cannot come back (its model or adapter is gone, its record is damaged) is not restored;
``lost`` says which and why (``stat``, ``ps --lost``).
"""
from __future__ import annotations

import logging

from llmos.drivers import text
from llmos.drivers.batch import SamplingParams
from llmos.kernel.journal import Saved
from llmos.kernel.models import AdapterRecord
from llmos.kernel.proc import Process, ProcState, Wait
from llmos.kernel.procio import ProcIO
from llmos.syscalls.errors import SyscallError

log = logging.getLogger("llmos.kernel")
# A process that ran (or waited for its turn to) comes back READY; these keep their state.
KEPT = (ProcState.BLOCKED, ProcState.STOPPED, ProcState.ZOMBIE)


def restore(procs, saved: list[Saved]) -> list[dict]:
    """Put every saved process back through ``procs`` (the ProcManager); returns the lost ones
    as ``{pid, uid, model, reason}``."""
    lost = []
    for s in saved:
        try:
            _restore_one(procs, s)
        except (SyscallError, KeyError, TypeError, ValueError) as exc:
            reason = exc.message if isinstance(exc, SyscallError) else f"{type(exc).__name__}: {exc}"
            lost.append({"pid": s.pid, "uid": s.fields.get("uid"), "model": s.fields.get("model"),
                         "reason": reason[:300]})
            log.warning("process %d not restored: %s", s.pid, reason)
    return lost


def _restore_one(procs, s: Saved) -> None:
    if procs.table.get(s.pid) is not None:
        raise ValueError("its pid is taken")
    bring_back(procs, procs.entry(s.fields["model"]), s.pid, s.fields, s.token_ids)


def bring_back(procs, entry, pid: int, f: dict, token_ids: list[int]) -> Process:
    """A process made from its journal record (or a checkpoint image's) put in the table as
    it was: queued on ``entry``'s scheduler, or waiting for the model. Raises (KeyError,
    TypeError, ValueError, SyscallError) and changes nothing when it cannot."""
    state = ProcState(f["state"])
    proc = Process(
        pid=pid, ppid=f["ppid"], uid=f["uid"], model=entry.name, created_at=f["created_at"], nice=f["nice"],
        sampling=SamplingParams(**f["sampling"]), max_tokens=f["max_tokens"], stop_token_ids=f["stop_token_ids"],
        ignore_eos=f["ignore_eos"], interactive=f["interactive"], adapter=f["adapter"], token_ids=list(token_ids),
        num_prompt_tokens=f["num_prompt_tokens"], turn_start=f["turn_start"], tokens_in=f["tokens_in"])
    if not 0 < proc.turn_start <= proc.num_tokens or proc.num_prompt_tokens > proc.num_tokens:
        raise ValueError(f"its turn starts at {proc.turn_start} of {proc.num_tokens} tokens")
    proc.finish_reason, proc.tokens_out = f["finish_reason"], f["tokens_out"]
    proc.session, proc.hup, proc.ended_at = f.get("session"), bool(f.get("hup")), f.get("ended_at")
    for name in ("num_preemptions", "num_swaps", "num_recomputes", "num_cached_tokens"):
        setattr(proc, name, f[name])
    if proc.adapter is not None and f.get("adapter_label") and proc.adapter not in entry.adapter_records:
        entry.adapter_records[proc.adapter] = AdapterRecord(proc.uid, f["adapter_label"])
    proc.io = io = ProcIO(decode=lambda ids, tok=entry.tokenizer: text.decode(tok, ids), stop=tuple(f["stop"]),
                          kg_facts=list(f["kg_facts"]))
    for token_id in proc.output_token_ids:          # the turn's text, cut at a stop string as it was
        if io.append(token_id):
            break
    io.turn_done, io.finish_reason = f["turn_done"], f["turn_finish_reason"]
    io.close_after_turn = f["close_after_turn"]
    proc.entry = entry
    if state is ProcState.ZOMBIE:
        proc.state = state
        procs.table.add(proc)
        return proc
    resident = procs.models.fault(entry, nice=proc.nice)
    if state in KEPT:
        proc.state = state
        proc.stopped_from = ProcState(f["stopped_from"]) if f["stopped_from"] else None
        if proc.stopped_from is not None and proc.stopped_from not in KEPT:
            proc.stopped_from = ProcState.READY
        proc.wait = Wait(f["wait"]) if f["wait"] else None
    if resident and proc.adapter is not None:
        procs.ensure_adapter(entry.engine, proc.adapter)
    procs.table.add(proc)
    if resident:
        entry.engine.sched.attach(proc)
        if proc.wait is Wait.MODEL:
            proc.wake()
    elif proc.wait is not Wait.INPUT:
        proc.block(Wait.MODEL)
    return proc
