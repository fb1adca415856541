"""Process syscalls: thin adapters from checked arguments to the scheduler.

Ownership is checked first (another user's pid is ``ESRCH``, exactly like a missing one);
scheduler refusals (``KeyError``/``ValueError``) become ``ESRCH``/``EBUSY`` replies.
"""
from __future__ import annotations

import math
import time

from llmos.drivers.batch import SamplingParams
from llmos.kernel import augment, objects, userfs
from llmos.kernel.proc import Process, ProcState
from llmos.kernel.procio import PENDING_REPLY, ProcIO, Waiter
from llmos.kernel.procspace import random_seed
from llmos.syscalls.errors import SyscallError

_LIVE = ("READY", "RUNNING", "BLOCKED", "STOPPED", "SWAPPED")


def _ps_row(k, p) -> dict:
    return {"pid": p.pid, "ppid": p.ppid, "user": k.users.name_of(p.uid), "state": p.state.name,
            "nice": p.nice, "model": p.model, "tokens_in": p.tokens_in, "tokens_out": p.tokens_out,
            "kv_blocks": len(p.block_ids), "kv_swapped": len(p.host_block_ids),
            "age_s": round(time.time() - p.created_at, 3)}


def sys_ps(k, call):
    return [_ps_row(k, p) for p in k.procs.visible(call, everyone=call.args["all"])]


def sys_pinfo(k, call):
    p = k.procs.get(call, call.args["pid"])
    io = k.procs.io[p.pid]
    s = p.sampling
    return {**_ps_row(k, p),
            "sampling": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                         "repetition_penalty": s.repetition_penalty, "seed": s.seed},
            "max_tokens": p.max_tokens, "interactive": p.interactive,
            "adapter": objects.adapter_label(k.procs.models, call.user, p.model, p.adapter),   # [objects]
            "finish_reason": io.finish_reason,
            "num_tokens": len(p.token_ids), "num_computed_tokens": p.num_computed_tokens,
            "cached_tokens": p.num_cached_tokens, "preemptions": p.num_preemptions,
            "swaps": p.num_swaps, "recomputes": p.num_recomputes, "events": io.events,
            "stop": list(io.stop), "kg_facts": io.kg_facts}


def sys_meminfo(k, call):
    """The default model's KV pool at the top level; every resident model's under ``pools``."""
    ps = k.procs
    if ps.models is None:
        raise SyscallError("ENOENT", "this kernel runs without models (--model none)")
    pools = {}
    for e in objects.visible_engines(ps, call.user):                           # [objects]
        info = dict(e.sched.meminfo())
        per_block = e.driver.kv_bytes_per_block()
        info.update(block_size=ps.cfg.block_size, bytes_per_block=per_block,
                    bytes_total=per_block * info["blocks_total"], bytes_used=per_block * info["blocks_used"],
                    bytes_swapped=per_block * info["blocks_swapped"])
        pools[e.name] = info
    return {**pools.get(ps.default.name, {}), "pools": pools}


def _sampling(args: dict, base: SamplingParams | None = None, seed: int | None = None) -> SamplingParams:
    b = base or SamplingParams()
    try:
        return SamplingParams(
            temperature=args.get("temperature") if args.get("temperature") is not None else b.temperature,
            top_p=args.get("top_p") if args.get("top_p") is not None else b.top_p,
            top_k=args.get("top_k") if args.get("top_k") is not None else b.top_k,
            repetition_penalty=args.get("repetition_penalty") if args.get("repetition_penalty") is not None
            else b.repetition_penalty,
            seed=seed if seed is not None else random_seed())
    except ValueError as exc:
        raise SyscallError("EINVAL", str(exc))


def _check_ids(name: str, ids: list, vocab: int) -> frozenset:
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise SyscallError("EINVAL", f"{name} must be token ids in [0, {vocab})")
    return frozenset(ids)


def sys_spawn(k, call):
    if userfs.is_store_path(call.args["adapter"]):            # replies when fs has exported it
        return userfs.spawn_with_store_adapter(k, call, lambda a: _spawn_kg(k, call, a))
    return _spawn_kg(k, call, call.args)


def _spawn_kg(k, call, a: dict):
    if a["kg"] not in (None, False):
        return augment.spawn_with_facts(k, call, spawn, a)  # replies when the facts are in
    return spawn(k, call, a)


def spawn(k, call, a: dict, kg_facts: list[str] = ()) -> int:
    ps, user = k.procs, call.user
    check_priority(user, a["priority"])
    entry = objects.resolve_model(ps, user, a["model"])                       # [objects]
    a = objects.check_adapter(entry, user, call.args["adapter"], a)            # [objects]
    ids = ps.tokens_for(entry, a)
    stop = tuple(s for s in (a["stop"] or []) if isinstance(s, str) and s)
    if len(stop) != len(a["stop"] or []):
        raise SyscallError("EINVAL", "stop must be a list of non-empty strings")
    sampling = _sampling(a, seed=a["seed"])
    stop_ids = _check_ids("stop_token_ids", a["stop_token_ids"] or [], entry.config.get_text_config().vocab_size)
    limit = ps.context_len(entry)
    if len(ids) >= limit:
        raise SyscallError("EINVAL", f"prompt is {len(ids)} tokens; the context window is {limit}")
    live = sum(1 for p in ps.all_procs() if p.uid == user.uid and p.state.name in _LIVE)
    if not user.is_root and live >= ps.cfg.max_procs_per_user:
        raise SyscallError("EAGAIN", f"process quota: user {user.name} has {live} of {ps.cfg.max_procs_per_user}")
    quota = ps.cfg.kv_quota_blocks
    need = math.ceil(min(limit, len(ids) + a["max_tokens"]) / ps.cfg.block_size)
    if quota is not None and not user.is_root and need > quota:
        raise SyscallError("ENOMEM", f"needs up to {need} KV blocks; user quota is {quota}")
    proc = Process(
        pid=ps.new_pid(), ppid=0, uid=user.uid, model=entry.name, nice=a["priority"],
        sampling=sampling, max_tokens=a["max_tokens"], stop_token_ids=stop_ids,
        ignore_eos=a["ignore_eos"], interactive=a["interactive"], adapter=a["adapter"], token_ids=ids)
    ps.start(proc, entry, stop)
    ps.io[proc.pid].kg_facts = list(kg_facts)
    if a["stopped"]:
        if proc.pid in ps.faulted:              # STOPPED once its model is in
            ps.parked_state[proc.pid] = ProcState.STOPPED
        else:
            ps.sched_of(proc.pid).stop(proc.pid)
    return proc.pid


def sys_write(k, call):
    ps, a = k.procs, call.args
    p = ps.get(call, a["pid"])
    sched = ps.sched_of(p.pid)
    if not p.interactive or p.state.name != "BLOCKED":
        raise SyscallError("EBUSY", f"process {p.pid} is {p.state.name}; write needs an interactive "
                                    f"process waiting for input")
    entry = ps.model_of[p.pid]
    ids = ps.tokens_for(entry, a, prompt_key="text", ids_key="ids")
    if len(p.token_ids) + len(ids) >= ps.context_len(entry):
        raise SyscallError("EINVAL", f"conversation would exceed the context window ({ps.context_len(entry)})")
    if a["max_tokens"] is not None:
        p.max_tokens = a["max_tokens"]
    ps.io[p.pid].new_turn()
    sched.append_input(p.pid, ids)
    entry.engine.idle = False
    return {"pid": p.pid, "tokens_in": len(ids)}


def sys_read(k, call):
    ps = k.procs
    p = ps.get(call, call.args["pid"])
    io = ps.io[p.pid]
    sofar = {"text": io.text, "token_ids": list(io.turn_ids)}
    if io.turn_done:
        return {**sofar, "finish_reason": io.finish_reason, "events": io.events}
    # Replay the turn so far, then stream the rest from where everyone else is.
    if io.num_streamed_ids:
        k.reply(call, {"text": io.text[:io.num_streamed_chars], "token_ids": io.turn_ids[:io.num_streamed_ids]},
                more=True)
    io.waiters.append(Waiter("read", call))
    return PENDING_REPLY


def sys_wait(k, call):
    ps = k.procs
    p = ps.get(call, call.args["pid"])
    io = ps.io[p.pid]
    if p.state.name == "ZOMBIE":
        return ps.reap(p.pid)
    if p.interactive:
        io.close_after_turn = True
        if p.state.name == "BLOCKED" and p.pid not in ps.faulted:   # between turns: nothing more will come
            ps.sched_of(p.pid).kill(p.pid)
            return ps.reap(p.pid)
    timeout = call.args["timeout"]
    io.waiters.append(Waiter("wait", call, None if timeout is None else time.monotonic() + timeout))
    return PENDING_REPLY


def sys_kill(k, call):
    ps, sig = k.procs, call.args["sig"]
    p = ps.get(call, call.args["pid"])
    if p.state.name == "ZOMBIE":
        raise SyscallError("ESRCH", f"process {p.pid} has exited (reap it with wait)")
    if sig == "INT" and not p.interactive:
        sig = "TERM"
    if p.pid in ps.faulted and sig in ("TERM", "KILL", "INT"):      # still waiting for its model
        p.state = ProcState.ZOMBIE
        ps.turn_done(p.pid, "terminated" if sig == "TERM" else "killed")
        return True
    if p.pid in ps.faulted and sig in ("STOP", "CONT"):      # applies once its model is in
        if sig == "STOP":
            ps.parked_state[p.pid] = ProcState.STOPPED
        elif ps.parked_state.get(p.pid) is ProcState.STOPPED:
            del ps.parked_state[p.pid]
        return True
    sched, entry = ps.sched_of(p.pid), ps.model_of[p.pid]
    try:
        if sig == "STOP":
            sched.stop(p.pid)
        elif sig == "CONT":
            sched.cont(p.pid)
        elif sig == "INT":                     # end the turn; the process waits for input
            if sched.finish(p.pid, "interrupted"):
                ps.turn_done(p.pid, "interrupted")
        else:
            sched.kill(p.pid)
            ps.turn_done(p.pid, "terminated" if sig == "TERM" else "killed")
    except (KeyError, ValueError) as exc:
        raise SyscallError("EBUSY", str(exc))
    entry.engine.idle = False              # (the process may be reaped already: a wait was pending)
    return True


def check_priority(user, nice: int) -> None:
    """Negative nice values (ahead of everyone's default) need the ``prio`` capability."""
    if nice < 0 and not (user.is_root or "prio" in user.caps):
        raise SyscallError("EPERM", f"priority {nice} < 0 needs capability 'prio', which user {user.name} lacks")


def sys_nice(k, call):
    p = k.procs.get(call, call.args["pid"])
    check_priority(call.user, call.args["value"])
    if p.pid in k.procs.faulted:
        p.nice = call.args["value"]
    else:
        k.procs.sched_of(p.pid).set_nice(p.pid, call.args["value"])
    return {"pid": p.pid, "nice": call.args["value"]}


def sys_fork(k, call):
    ps, a = k.procs, call.args
    parent = ps.get(call, a["pid"])
    if parent.state.name == "ZOMBIE":
        raise SyscallError("ESRCH", f"process {parent.pid} has exited")
    sched, entry = ps.sched_of(parent.pid), ps.model_of[parent.pid]
    pids = []
    for i in range(a["n"]):
        seed = a["seed"] + i if a["seed"] is not None else None
        child = Process(
            pid=ps.new_pid(), ppid=parent.pid, uid=parent.uid, model=parent.model, nice=parent.nice,
            sampling=_sampling(a, base=parent.sampling, seed=seed), max_tokens=parent.max_tokens,
            stop_token_ids=parent.stop_token_ids, ignore_eos=parent.ignore_eos,
            interactive=parent.interactive, adapter=parent.adapter, token_ids=list(parent.token_ids))
        try:
            sched.fork(parent.pid, child)
        except (KeyError, ValueError) as exc:
            raise SyscallError("EBUSY", str(exc))
        pio = ps.io[parent.pid]
        cio = ProcIO(decode=pio.decode, stop=pio.stop, turn_ids=list(pio.turn_ids), text=pio.text,
                     turn_done=pio.turn_done, finish_reason=pio.finish_reason)
        ps.io[child.pid] = cio
        ps.model_of[child.pid] = entry
        pids.append(child.pid)
    entry.engine.idle = False
    return pids
