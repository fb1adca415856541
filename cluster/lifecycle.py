"""Kernels joining, dying, coming back and leaving: the front's side of Ray's membership.

- **Join**: once an actor has booted (``info`` answered), the front connects, gives it the
  head's users (``users_sync``; the head's own table is copied first), learns which processes
  it already has (a restarted kernel's journal brought them back), and marks it UP.
- **Death**: the front holds a ``watch`` call per kernel; Ray answers it the moment the kernel
  exits or its actor dies. Calls in flight for its processes wait (parked); others fail with
  EHOSTDOWN. A new ``info`` call answers once Ray has restarted the actor: the kernel rejoins,
  and each of its processes is either back (its parked calls are sent again, a ``read``
  resuming after what was passed on) or lost (EHOSTDOWN to every call about it). An actor Ray
  cannot bring back is GONE: all its processes are lost, every other kernel serves on.
- **Drain**: each live process is checkpointed, restored on another kernel (by placement, for
  its owner, in its session), and the original killed; calls about it follow it. Ended
  processes' results stay at the front. Then the kernel stops and its actor is removed.
"""
from __future__ import annotations

import logging
import time

from llmos.cluster import drain, launch
from llmos.cluster.members import Member, MemberState
from llmos.syscalls.errors import SyscallError

log = logging.getLogger("llmos.cluster")
HEAD = 0
TICK = 0.2              # seconds between looks at Ray's answers
POLL = 0.5              # seconds between load polls of each kernel
MODELS_EVERY = 4        # polls between model-residency polls
BOOT_TIMEOUT = 300.0    # seconds a new kernel may take to be placed and boot
SESSION_MEMORY = 600.0  # seconds a silent session is remembered (kernels end theirs far sooner)


def boot(front) -> None:
    """Adopt the cluster's kernel actors if they exist (a front restarting), else start them."""
    cfg = front.cfg
    launch.connect(cfg.address)
    adopted = launch.find_kernels()
    for kid, actor in sorted(adopted.items()):
        front.members[kid] = Member(kid, actor, info_ref=actor.info.remote())
    if adopted:
        n = front.pids.load(front.pids_file)
        log.info("adopted kernels %s and %d processes' pids", sorted(adopted), n)
    else:
        front.pids_file.unlink(missing_ok=True)      # a new cluster: no process of an old one is here
        start(front, list(range(cfg.num_kernels)))


def start(front, ids: list[int]) -> None:
    """New kernels ``ids``, in bundles drained kernels left free first."""
    cfg = front.cfg
    for kid, (actor, slot) in launch.start_kernels(ids, cfg.state_dir, cfg.kernel_args, front.public.decode(),
                                                   cfg.kernel_cpus, cfg.per_gpu, front.free_slots).items():
        front.members[kid] = Member(kid, actor, info_ref=actor.info.remote(), slot=slot)


def tick(front, now: float) -> None:
    """Ray's news (boots, deaths) and the kernels' load."""
    import ray
    refs = {}
    for m in front.members.values():
        for ref in (m.watch_ref, m.info_ref):
            if ref is not None:
                refs[ref] = m
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0) if refs else ([], [])
    for ref in ready:
        m = refs[ref]
        if ref is m.watch_ref:
            m.watch_ref = None
            if m.state is not MemberState.GONE:
                on_down(front, m)
        elif ref is m.info_ref:
            try:
                info = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:     # restarting: ask again
                m.info_ref = m.actor.info.remote()
                continue
            except Exception as exc:           # Ray cannot bring it back
                m.info_ref = None
                on_gone(front, m, f"kernel {m.kernel}'s actor is gone: {type(exc).__name__}: {exc}"[:300])
                continue
            if m.kernel == HEAD or front.users_ready:      # the others wait for the head's users
                m.info_ref = None
                join(front, m, info)
    for m in front.members.values():
        if m.state is MemberState.UP and not m.polling and now - m.polled_at >= POLL:
            poll(front, m, now)
    if front.pids.dirty:
        front.pids.save(front.pids_file)
    if now - front.last_purge > SESSION_MEMORY:
        front.last_purge = now
        front.forget_sessions(SESSION_MEMORY)
    done = [w for w in front.waiters if w[0]()]
    for w in done:
        front.waiters.remove(w)
        w[1]()


def poll(front, m: Member, now: float) -> None:
    m.polling, m.polled_at = True, now
    m.num_polls += 1

    def on_stat(env):
        m.polling = False
        if env.get("ok") and isinstance(env.get("result"), dict):
            m.stats = env["result"]
            procs = m.stats.get("procs") or {}
            m.load = sum(n for state, n in procs.items() if str(state).lower() != "zombie") if isinstance(procs, dict) else 0
    front.ask(m.kernel, "stat", {}, on_stat)
    if m.num_polls % MODELS_EVERY == 1:
        def on_models(env):
            if env.get("ok") and isinstance(env.get("result"), list):
                m.models = {r.get("name"): r.get("where") for r in env["result"] if isinstance(r, dict)}
        front.ask(m.kernel, "models", {}, on_models)


def join(front, m: Member, info: dict) -> None:
    m.info, m.boot_id = info, None
    m.state = MemberState.JOINING
    m.connect(front.ctx, front.public, front.secret)
    m.watch_ref = m.actor.watch.remote()
    front.index.forget(m.kernel)
    if m.kernel == HEAD:
        front.token = front.token or info["token"]

        def on_table(env, retried=False):
            if not env.get("ok") and not retried:
                front.token = info["token"]       # the cluster's root is the head's own at its first boot
                return front.ask(HEAD, "users_sync", {}, lambda e: on_table(e, True))
            if not env.get("ok"):
                return on_gone(front, m, f"the head kernel refused root's token: {env.get('error')}")
            front.users.replace(env["result"])
            front.users_ready = True
            for other in front.members.values():       # a restarted head has a new address
                if other.kernel != HEAD and other.state in (MemberState.UP, MemberState.DRAINING):
                    front.ask(other.kernel, "users_sync", {"upstream": upstream_of(front, other)}, lambda e: None)
            reconcile(front, m)
        return front.ask(HEAD, "users_sync", {}, on_table)

    join_args = {"table": front.users.export(), "upstream": upstream_of(front, m)}

    def on_synced(env, retried=False):
        if not env.get("ok") and not retried:     # first boot: only its own root token works
            return front.ask(m.kernel, "users_sync", join_args, lambda e: on_synced(e, True), token=info["token"])
        if not env.get("ok"):
            return on_gone(front, m, f"kernel {m.kernel} refused the cluster's users: {env.get('error')}")
        reconcile(front, m)
    front.ask(m.kernel, "users_sync", join_args, on_synced)


def upstream_of(front, m: Member) -> dict:
    """Where kernel ``m`` reaches the head's services: its ipc socket on the same node, else CURVE."""
    head = front.members[HEAD].info
    same = head.get("node") == m.info.get("node")
    return {"endpoint": head["socket"] if same else head["listen"], "server_key": head["server_key"],
            "token": front.token}


def reconcile(front, m: Member) -> None:
    """Which of the kernel's known processes it still has; then UP, and parked calls go out."""
    def on_ps(env):
        here = {r.get("pid") for r in env.get("result") or [] if isinstance(r, dict)} if env.get("ok") else set()
        for gpid in front.pids.on_kernel(m.kernel):
            if front.pids.where[gpid].lpid not in here:
                lose(front, gpid, f"process {gpid} was lost with kernel {m.kernel} (its journal did not bring it back)")
        for lpid in sorted(here):
            front.pids.gpid_of(m.kernel, lpid)
        m.boot_id = f"{m.info.get('host')}:{m.info.get('pid')}"
        m.state = MemberState.UP
        parked, m.parked = m.parked, []
        for fwd in parked:
            front.issue(fwd)
    front.ask(m.kernel, "ps", {"all": True}, on_ps)


def lose(front, gpid: int, why: str) -> None:
    w = front.pids.where.get(gpid)
    front.kept[gpid] = {"uid": w.uid if w else None, "error": ("EHOSTDOWN", why)}
    front.pids.drop(gpid)
    front.count("lost")


def on_down(front, m: Member) -> None:
    log.warning("kernel %d is down; waiting for Ray to restart it", m.kernel)
    m.state, m.restarts = MemberState.DOWN, m.restarts + 1
    m.close()
    front.index.forget(m.kernel)
    for fid, p in [(f, p) for f, p in front.pending.items() if p.kernel == m.kernel]:
        del front.pending[fid]
        if p.fwd is not None and p.fwd.gpid is not None:
            m.parked.append(p.fwd)
        else:
            p.on_reply({"ok": False, "more": False, "error": SyscallError(
                "EHOSTDOWN", f"kernel {m.kernel} went down during the call").to_wire()})
    m.info_ref = m.actor.info.remote()


def on_gone(front, m: Member, why: str) -> None:
    log.error("%s", why)
    m.state = MemberState.GONE
    m.close()
    if m.slot is not None:                       # its bundle takes the next cluster_add
        front.free_slots.append(m.slot)
        m.slot = None
    for gpid in front.pids.on_kernel(m.kernel):
        lose(front, gpid, why)
    parked, m.parked = m.parked, []
    for fwd in parked:
        front.issue(fwd)


def sync_users(front, then) -> None:
    """The head's table copied here and to every other kernel; ``then`` once all have it."""
    def on_table(env):
        if env.get("ok"):
            front.users.replace(env["result"])
        others = [m.kernel for m in front.members.values() if m.kernel != HEAD and m.sock is not None
                  and m.state in (MemberState.UP, MemberState.DRAINING)]
        left = set(others)
        if not left:
            return then()

        def on_done(k):
            left.discard(k)
            if not left:
                then()
        table = front.users.export()
        for k in others:
            front.ask(k, "users_sync", {"table": table}, lambda env, k=k: on_done(k))
    front.ask(HEAD, "users_sync", {}, on_table)


# -- the front's own calls (their capability checked from the table by the front) -------------
def sys_cluster(front, fwd) -> None:
    import ray
    nodes = [{"node": n["NodeID"], "address": n.get("NodeManagerAddress"), "alive": bool(n.get("Alive")),
              "resources": n.get("Resources", {})} for n in ray.nodes()]
    front.answer(fwd, {"nodes": nodes, "kernels": [m.row() for m in sorted(front.members.values(),
                                                                              key=lambda m: m.kernel)],
                       "placement": {"policy": front.policy.mode, **front.counters},
                       "processes": len(front.pids.where), "boot_id": front.boot_id})


def sys_cluster_add(front, fwd) -> None:
    n = fwd.req.args.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
        raise SyscallError("EINVAL", "cluster_add: n is 1 to 64")
    first = max(front.members, default=-1) + 1
    ids = list(range(first, first + n))
    start(front, ids)
    deadline = time.monotonic() + BOOT_TIMEOUT

    def settled() -> bool:
        if time.monotonic() > deadline:          # Ray could not place them: give up on the rest
            for k in ids:
                if front.members[k].state is MemberState.JOINING:
                    on_gone(front, front.members[k], f"kernel {k} did not boot in {BOOT_TIMEOUT:.0f} s "
                                                     "(no free resources in the cluster?)")
                    launch.remove({k: front.members[k].actor}, groups=False)
        return all(front.members[k].state in (MemberState.UP, MemberState.GONE) for k in ids)
    front.when(settled,
               lambda: front.answer(fwd, {"kernels": [k for k in ids if front.members[k].state is MemberState.UP]}))


def sys_shutdown(front, fwd) -> None:
    mode = fwd.req.args.get("mode") or "checkpoint"
    if mode not in ("checkpoint", "drain", "discard"):
        raise SyscallError("EINVAL", "shutdown: mode is checkpoint, drain or discard")
    front.answer(fwd, True)
    front.stop_all = mode
    front.running = False


FRONT_CALLS = {"cluster": sys_cluster, "cluster_add": sys_cluster_add, "shutdown": sys_shutdown,
               "cluster_drain": drain.sys_cluster_drain}
