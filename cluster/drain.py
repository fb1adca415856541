"""``cluster_drain``: move a kernel's processes to the others, then stop it.

Each live process is checkpointed where it runs, restored on the kernel placement picks (for
its owner, in its own session: ``restore(uid=…)``), and only then killed where it was; calls in
flight about it are sent again to its new place (a ``read`` resuming after the tokens already
passed on, so a reader sees each token once, and identical ones since sampling is a function of
seed and position). Its gpid does not change. A process that has ended is reaped and its result
kept at the front, where ``wait``/``read`` still find it. A kernel is drained in rounds until
it has no live process (a ``fork`` during the drain adds one), then stopped and removed from Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llmos.cluster.members import MemberState
from llmos.cluster.pids import translate
from llmos.syscalls.errors import SyscallError

MAX_ROUNDS = 5


@dataclass
class Job:
    fwd: object
    kernels: list
    left: set
    moved: list = field(default_factory=list)
    failed: list = field(default_factory=list)


def sys_cluster_drain(front, fwd) -> None:
    a = fwd.req.args
    kernel, node = a.get("kernel"), a.get("node")
    if (kernel is None) == (node is None):
        raise SyscallError("EINVAL", "cluster_drain takes a kernel or a node (one of them)")
    targets = [m for m in front.members.values() if m.state is MemberState.UP
               and ((kernel is not None and m.kernel == kernel) or (node is not None and node in (m.node, m.info.get("node"))))]
    if not targets:
        raise SyscallError("EINVAL", f"no kernel up {'numbered ' + str(kernel) if kernel is not None else 'on ' + str(node)}")
    if not any(m.state is MemberState.UP and m not in targets for m in front.members.values()):
        raise SyscallError("EBUSY", "no other kernel is up to take its processes")
    job = Job(fwd, [m.kernel for m in targets], {m.kernel for m in targets})
    for m in targets:
        m.state = MemberState.DRAINING
        drain_round(front, m, job, 1)


def drain_round(front, m, job: Job, num: int) -> None:
    """One round: every process the kernel has now, moved (live) or kept (ended); the round
    after one that found nothing live stops the kernel."""
    def on_ps(env):
        rows = [r for r in env.get("result") or [] if isinstance(r, dict)] if env.get("ok") else []
        last = num > MAX_ROUNDS or (num > 1 and all(_ended(r) for r in rows))
        then = (lambda: finish_kernel(front, m, job)) if last else (lambda: drain_round(front, m, job, num + 1))
        left = {"n": len(rows)}

        def done_one():
            left["n"] -= 1
            if left["n"] == 0:
                then()
        if not rows:
            return then()
        for r in rows:
            if _ended(r):
                keep(front, m, r["pid"], done_one)
            elif last:
                job.failed.append({"pid": front.pids.gpid_of(m.kernel, r["pid"]), "error": "still running after "
                                   f"{MAX_ROUNDS} rounds (forked during the drain)"})
                done_one()
            else:
                move(front, m, r, job, done_one)
    front.ask(m.kernel, "ps", {"all": True}, on_ps)


def _ended(row: dict) -> bool:
    return str(row.get("state")).upper() == "ZOMBIE"


def keep(front, m, lpid: int, then) -> None:
    """Reap an ended process and keep its result at the front."""
    gpid = front.pids.gpid_of(m.kernel, lpid)
    uid = front.pids.where[gpid].uid

    def on_wait(env):
        if env.get("ok"):
            front.kept[gpid] = {"uid": uid, "result": translate(front.pids, "wait", m.kernel, env["result"])}
            front.pids.drop(gpid)
        then()
    front.ask(m.kernel, "wait", {"pid": lpid, "timeout": 0}, on_wait)


def move(front, m, row: dict, job: Job, then) -> None:
    lpid = row["pid"]
    gpid = front.pids.gpid_of(m.kernel, lpid)
    owner = front.users.users.get(row.get("user"))
    if front.pids.where[gpid].uid is None and owner is not None:
        front.pids.where[gpid].uid = owner.uid

    def failed(env):
        job.failed.append({"pid": gpid, "error": (env.get("error") or {}).get("message", "?")})
        then()

    def on_image(env):
        if not env.get("ok"):
            if (env.get("error") or {}).get("errno") == "EINVAL":    # it ended meanwhile
                return keep(front, m, lpid, then)
            return failed(env)
        image = env["result"]
        key, model = tuple(image.get("token_ids") or ()), (image.get("model") or {}).get("name", "")
        try:
            target, why = front.place(None, key, model, needs_head=image.get("adapter") is not None,
                                      exclude=m.kernel)
        except SyscallError as err:
            return failed({"error": err.to_wire()})
        args = {"image": image, **({"uid": owner.uid} if owner is not None else {})}

        def on_restored(env):
            if not env.get("ok"):
                return failed(env)
            front.pids.move(gpid, target, env["result"], {**why, "reason": "migrated", "from": m.kernel})
            front.index.insert(target, key, model)
            front.members[target].load += 1
            job.moved.append(gpid)
            front.count("migrated")
            for fid, p in list(front.pending.items()):      # calls in flight follow it
                if p.kernel == m.kernel and p.fwd is not None and p.fwd.gpid == gpid:
                    del front.pending[fid]
                    front.issue(p.fwd)
            front.ask(m.kernel, "kill", {"pid": lpid, "sig": "KILL"},
                      lambda e: front.ask(m.kernel, "wait", {"pid": lpid}, lambda e2: then()))
        front.ask(target, "restore", args, on_restored)
    front.ask(m.kernel, "checkpoint", {"pid": lpid}, on_image)


def finish_kernel(front, m, job: Job) -> None:
    """Stop the drained kernel and remove its actor; answer once every kernel of the job is done."""
    import ray
    m.state = MemberState.GONE
    m.close()
    ref = m.actor.stop.remote("checkpoint", front.token)

    def stopped():
        try:
            ray.kill(m.actor, no_restart=True)
        except Exception:
            pass
        if m.slot is not None:
            front.free_slots.append(m.slot)      # the next cluster_add runs there
            m.slot = None
        job.left.discard(m.kernel)
        if not job.left:
            front.answer(job.fwd, {"kernels": job.kernels, "moved": sorted(job.moved), "failed": job.failed})
    front.when(lambda: bool(ray.wait([ref], timeout=0)[0]), stopped)
