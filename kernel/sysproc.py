"""Process syscalls: thin adapters from checked arguments to the process manager.

Ownership is checked first (another user's pid is ``ESRCH``, exactly like a missing one); the
table has checked every argument's type and shape; what is left here is what depends on the
model (vocabulary, context window) and on the caller (quotas, priority).
"""
from __future__ import annotations

import secrets
import time

from llmos.drivers.batch import SamplingParams
from llmos.kernel import audit, augment, objects, prompts, systenancy, userfs
from llmos.kernel.proc import Process, ProcState
from llmos.kernel.procio import PENDING_REPLY, Waiter, WaitKind
from llmos.kernel.procmgr import Signal
from llmos.syscalls.errors import SyscallError


def _ps_row(k, p) -> dict:
    sched = k.procs.sched_of(p)
    blocks = sched.block_manager.blocks if sched is not None else ()
    return {"pid": p.pid, "ppid": p.ppid, "user": k.users.name_of(p.uid), "state": p.state.name,
            "wait": p.wait.value if p.wait is not None and p.state is not ProcState.ZOMBIE else None,
            "nice": p.nice, "model": p.model, "tokens_in": p.tokens_in, "tokens_out": p.tokens_out,
            "kv_blocks": len(p.block_ids), "kv_shared": sum(1 for b in p.block_ids if blocks[b].ref_count > 1),
            "kv_swapped": len(p.host_block_ids), "age_s": round(time.time() - p.created_at, 3)}


def sys_ps(k, call):
    if call.args["lost"]:
        return [x for x in k.lost if x["uid"] == call.user.uid or (call.user.is_root and call.args["all"])]
    return [_ps_row(k, p) for p in k.table.visible(call.user, everyone=call.args["all"])]


def sys_pinfo(k, call):
    p = k.table.owned(call.user, call.args["pid"])
    io, s = p.io, p.sampling
    return {**_ps_row(k, p),
            "sampling": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                         "repetition_penalty": s.repetition_penalty, "seed": s.seed},
            "max_tokens": p.max_tokens, "interactive": p.interactive,
            "adapter": objects.adapter_label(k.procs.models, call.user, p.model, p.adapter),
            "finish_reason": io.finish_reason,
            "num_tokens": len(p.token_ids), "num_computed_tokens": p.num_computed_tokens,
            "cached_tokens": p.num_cached_tokens, "preemptions": p.num_preemptions,
            "swaps": p.num_swaps, "recomputes": p.num_recomputes, "events": io.events,
            "stop": list(io.stop), "kg_facts": io.kg_facts, "hup": p.hup, "session": p.session is not None,
            "reap_in_s": k.sessions.reap_in(p)}


def sys_meminfo(k, call):
    """The default model's KV pool at the top level; every resident model's under ``pools``."""
    ps = k.procs
    if ps.models is None:
        raise SyscallError("ENOENT", "this kernel runs without models (--model none)")
    pools = {}
    for e in objects.visible_engines(ps, call.user):                        
        info = dict(e.sched.meminfo())
        per_block = e.driver.kv_bytes_per_block()
        info.update(block_size=ps.cfg.block_size, bytes_per_block=per_block,
                    bytes_total=per_block * info["blocks_total"], bytes_used=per_block * info["blocks_used"],
                    bytes_swapped=per_block * info["blocks_swapped"])
        pools[e.name] = info
    return {**pools.get(ps.default.name, {}), "pools": pools}


def _sampling(args: dict, base: SamplingParams | None = None, seed: int | None = None) -> SamplingParams:
    b = base or SamplingParams()
    pick = lambda name: args[name] if args.get(name) is not None else getattr(b, name)  # noqa: E731
    try:
        return SamplingParams(temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
                              repetition_penalty=pick("repetition_penalty"),
                              seed=seed if seed is not None else secrets.randbits(63))
    except ValueError as exc:
        raise SyscallError("EINVAL", str(exc))


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
    if k.stop_mode == "drain":
        raise SyscallError("EAGAIN", "the kernel is draining to stop: no new processes")
    check_priority(user, a["priority"])
    entry = objects.resolve_model(ps, user, a["model"])
    a = objects.check_adapter(entry, user, call.args["adapter"], a)
    ids = prompts.tokens_for(entry, a)
    stop_ids = prompts.check_ids("stop_token_ids", a["stop_token_ids"] or [], prompts.vocab_size(entry))
    limit = prompts.context_len(entry)
    if len(ids) >= limit:
        raise SyscallError("EINVAL", f"prompt is {len(ids)} tokens; the context window is {limit}")
    systenancy.check_procs(k, user, 1)
    systenancy.check_kv(k, user, min(limit, len(ids) + a["max_tokens"]), entry)
    proc = Process(
        pid=k.table.new_pid(), ppid=0, uid=user.uid, model=entry.name, nice=a["priority"],
        sampling=_sampling(a, seed=a["seed"]), max_tokens=a["max_tokens"], stop_token_ids=stop_ids,
        ignore_eos=a["ignore_eos"], interactive=a["interactive"], adapter=a["adapter"], token_ids=ids,
        session=getattr(call, "session", None), hup=a["hup"])
    ps.start(proc, entry, tuple(a["stop"] or ()), kg_facts)
    if a["stopped"]:
        ps.signal(proc, Signal.STOP)
    return proc.pid


def sys_write(k, call):
    a = call.args
    p = k.table.owned(call.user, a["pid"])
    if not p.interactive or not p.waits_for_input:
        raise SyscallError("EBUSY", f"process {p.pid} is {p.state.name}; write needs an interactive "
                                    f"process waiting for input")
    ids = prompts.tokens_for(p.entry, a, prompt_key="text", ids_key="ids")
    limit = prompts.context_len(p.entry)
    if len(p.token_ids) + len(ids) >= limit:
        raise SyscallError("EINVAL", f"conversation would exceed the context window ({limit})")
    systenancy.check_kv(k, call.user, len(p.token_ids) + len(ids) + 1, p.entry)
    if a["max_tokens"] is not None:
        p.max_tokens = a["max_tokens"]
    k.procs.write(p, ids)
    return {"pid": p.pid, "tokens_in": len(ids)}


def sys_read(k, call):
    p = k.table.owned(call.user, call.args["pid"])
    io, ids, chars = p.io, call.args["since"], call.args["since_text"]
    if io.turn_done:
        return {"text": io.text[chars:], "token_ids": io.turn_ids[ids:], "finish_reason": io.finish_reason,
                "events": io.events}
    # Replay the turn so far (past what the caller has), then stream the rest from where everyone else is.
    if io.num_streamed_ids > ids or io.num_streamed_chars > chars:
        k.outbox.reply(call, {"text": io.text[chars:io.num_streamed_chars],
                              "token_ids": io.turn_ids[ids:io.num_streamed_ids]}, more=True)
    k.procs.add_waiter(p, Waiter(WaitKind.READ, call, seen_ids=max(ids, io.num_streamed_ids),
                                 seen_chars=max(chars, io.num_streamed_chars)))
    return PENDING_REPLY


def sys_wait(k, call):
    p = k.table.owned(call.user, call.args["pid"])
    if not p.is_alive:
        return k.procs.reap(p)
    if p.interactive:
        p.io.close_after_turn = True
        if p.waits_for_input:                # between turns: nothing more will come
            k.procs.terminate(p, "killed", announce=False)
            return k.procs.reap(p)
    timeout = call.args["timeout"]
    k.procs.add_waiter(p, Waiter(WaitKind.WAIT, call, None if timeout is None else time.monotonic() + timeout))
    return PENDING_REPLY


def sys_kill(k, call):
    proc = k.table.owned(call.user, call.args["pid"])
    if proc.uid != call.user.uid:
        audit.event("signal_other", user=call.user.name, pid=proc.pid, owner=k.users.name_of(proc.uid),
                    sig=call.args["sig"])
    k.procs.signal(proc, Signal(call.args["sig"]))
    return True


def check_priority(user, nice: int) -> None:
    """Negative nice values (ahead of everyone's default) need the ``prio`` capability."""
    if nice < 0 and not (user.is_root or "prio" in user.caps):
        raise SyscallError("EPERM", f"priority {nice} < 0 needs capability 'prio', which user {user.name} lacks")


def sys_nice(k, call):
    p = k.table.live(call.args["pid"], call.user)
    check_priority(call.user, call.args["value"])
    p.nice = call.args["value"]
    return {"pid": p.pid, "nice": p.nice}


def sys_fork(k, call):
    a = call.args
    parent = k.table.live(a["pid"], call.user)
    systenancy.check_procs(k, call.user, a["n"])
    pids = []
    for i in range(a["n"]):
        seed = a["seed"] + i if a["seed"] is not None else None
        child = Process(
            pid=k.table.new_pid(), ppid=parent.pid, uid=parent.uid, model=parent.model, nice=parent.nice,
            sampling=_sampling(a, base=parent.sampling, seed=seed), max_tokens=parent.max_tokens,
            stop_token_ids=parent.stop_token_ids, ignore_eos=parent.ignore_eos,
            interactive=parent.interactive, adapter=parent.adapter, token_ids=list(parent.token_ids),
            session=parent.session, hup=parent.hup)
        k.procs.fork(parent, child)
        pids.append(child.pid)
    return pids
