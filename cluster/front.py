"""The front: one ABI endpoint for a cluster of kernels, so ``connect()`` cannot tell it from one.

It serves the usual local socket (and CURVE TCP with ``--listen``) and routes each call:

- by pid (``read``, ``wait``, ``kill``, ``fork``, ...): to the kernel that runs the process, its
  global pid turned into that kernel's own (``pids.py``); a process that moved meanwhile is
  asked again where it is now (a ``read`` resumes after the tokens already passed on);
- ``spawn`` and ``restore``: to the kernel ``placement.choose`` picks;
- ``ps``, ``models``, ``stat``, ``meminfo``, ...: to every kernel, the answers merged;
  ``model_load``/``model_unload``: to every kernel;
- the cluster's own calls (``cluster``, ``cluster_drain``, ``cluster_add``, ``shutdown``): here;
- everything else (users, services: files, graph, tuner; audit, alerts): to the head kernel,
  kernel 0, which holds the cluster's one user table and runs its services. A call that changes
  users is answered once every kernel has the new table (``users_sync``).

Tokens travel unchanged: every kernel authenticates them against the same table, so each
checks capabilities, ownership and its own quotas as it would alone; the front counts processes
per user across the cluster. A request the front cannot authenticate goes to the head, which
answers it (and audits it) as a kernel would. The member lifecycle (joins, deaths, restarts,
drains) is in ``lifecycle.py``.
"""
from __future__ import annotations

import itertools
import logging
import secrets
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack
import zmq
import zmq.auth

from llmos.cluster import lifecycle, merge
from llmos.cluster.members import Member, MemberState
from llmos.cluster.pids import PidTable, translate
from llmos.cluster.placement import Candidate, Policy, PrefixIndex, choose, prompt_key
from llmos.kernel import curve
from llmos.kernel.security import UserDB
from llmos.kernel.userfs import is_store_path
from llmos.syscalls import abi
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.remote import make_key_pair
from llmos.syscalls.table import BY_NAME, BY_NUM

log = logging.getLogger("llmos.cluster")
HEAD = 0
PID_CALLS = frozenset({"write", "read", "wait", "kill", "nice", "fork", "pinfo", "feedback", "checkpoint"})
GATHER_CALLS = frozenset({"ps", "models", "shares", "meminfo", "stat", "free", "devinfo", "mm_leases"})
EVERY_KERNEL = frozenset({"model_load", "model_unload"})
USER_CHANGES = frozenset({"user_add", "user_token", "user_set", "user_key"})


@dataclass
class FrontConfig:
    state_dir: Path
    socket: str
    listen: str | None = None
    address: str = "auto"                  # the Ray cluster
    num_kernels: int = 1
    per_gpu: bool = False
    kernel_cpus: float = 1.0
    kernel_args: list = field(default_factory=list)
    policy: Policy = field(default_factory=Policy)
    max_frame: int = abi.MAX_FRAME_BYTES
    max_procs_per_user: int = 1024


@dataclass
class Forward:
    """A client's call in flight through the front."""
    identity: bytes
    req: abi.Request
    name: str
    user: Any = None
    gpid: int | None = None
    version: int = -1                      # the process's location version it was sent to
    attempt: int = 0
    num_tokens: int = 0                    # read: token ids and characters passed on so far
    num_text: int = 0


@dataclass
class Pending:
    kernel: int
    on_reply: Callable[[dict], None]
    fwd: Forward | None = None


def error_env(errno: str, message: str) -> dict:
    return {"ok": False, "error": SyscallError(errno, message).to_wire(), "more": False}


class Front:
    def __init__(self, cfg: FrontConfig):
        self.cfg = cfg
        self.ctx = zmq.Context.instance()
        (cfg.state_dir / "front").mkdir(mode=0o700, exist_ok=True)
        self.users = UserDB(cfg.state_dir / "front" / "users.json")     # the head's table, copied
        self.public, self.secret = zmq.auth.load_certificate(str(make_key_pair(cfg.state_dir / "keys", "front")))
        self.last_tick, self.last_purge = 0.0, time.monotonic()
        self.stop_all: str | None = None                       # shutdown's mode, once asked to stop all
        self.poller, self.polled = None, None                  # serve.pump's, rebuilt when sockets change
        self.members: dict[int, Member] = {}
        self.pids, self.index, self.policy = PidTable(), PrefixIndex(), cfg.policy
        self.pids_file = cfg.state_dir / "front" / "pids"                  # saved each tick it changed
        self.pending: dict[int, Pending] = {}
        self.fids = itertools.count(1)
        self.sessions: dict[str, set[int]] = {}               # session -> kernels it has used
        self.session_seen: dict[str, float] = {}              # session -> when it last sent anything
        self.kept: dict[int, dict] = {}                        # gpid -> {uid, result|error}: ended off-kernel
        self.counters: dict[str, int] = {}
        self.boot_id = secrets.token_hex(8)
        self.token: str | None = None                          # root's, from the head
        self.users_ready = False                               # the head's users are copied here
        self.running, self.turn = True, 0
        self.io = None                                         # FrontIO, once booted
        self.free_slots: list = []                             # bundles drained kernels left
        self.waiters: list[tuple[Callable[[], bool], Callable[[], None]]] = []

    # -- sending --------------------------------------------------------------------------------
    def ask(self, kernel: int, call: str, args: dict, on_reply: Callable[[dict], None], token: str | None = None,
            session: str | None = None, fwd: Forward | None = None) -> None:
        """Send one call to a kernel; ``on_reply`` gets each reply envelope (a stream's several)."""
        m = self.members.get(kernel)
        if m is None or m.sock is None:
            return on_reply(error_env("EHOSTDOWN", f"kernel {kernel} is not up"))
        fid = next(self.fids)
        self.pending[fid] = Pending(kernel, on_reply, fwd)
        try:
            m.send(fid, call, args, token or self.token, session)
        except zmq.Again:
            del self.pending[fid]
            on_reply(error_env("EAGAIN", f"kernel {kernel} is not taking calls fast enough; try again"))

    def answer(self, fwd: Forward, result: Any = None, err: SyscallError | None = None, more: bool = False) -> None:
        frame = abi.encode_error(fwd.req.rid, err) if err else abi.encode_reply(fwd.req.rid, result, more)
        self.io.channel.send_multipart([fwd.identity, frame])

    def pass_on(self, fwd: Forward, env: dict) -> None:
        """A kernel's reply envelope, as it is, under the client's request id."""
        self.io.channel.send_multipart([fwd.identity, msgpack.packb({**env, "id": fwd.req.rid})])

    def when(self, ready: Callable[[], bool], then: Callable[[], None]) -> None:
        """Run ``then`` at the first tick where ``ready()`` holds."""
        self.waiters.append((ready, then))

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # -- receiving ------------------------------------------------------------------------------
    def on_kernel_frame(self, m: Member, frame: bytes) -> None:
        try:
            env = msgpack.unpackb(frame, raw=False, strict_map_key=False)
            p = self.pending.get(env.get("id"))
        except Exception:
            return
        if p is None or p.kernel != m.kernel:
            return
        if not env.get("more"):
            del self.pending[env["id"]]
        try:
            p.on_reply(env)
        except Exception:                     # a bug in a continuation must not take the front down
            log.error("front: reply handler failed: %s", traceback.format_exc())
            if p.fwd is not None:
                self.answer(p.fwd, err=SyscallError("EIO", "the front failed on this reply (see front.log)"))

    def on_request(self, identity: bytes, frames: list[bytes]) -> None:
        if len(frames) != 1:
            return
        try:
            req = abi.decode_request(frames[0], max_frame=self.cfg.max_frame)
        except SyscallError as err:
            if err.rid is not None:
                self.io.channel.send_multipart([identity, abi.encode_error(err.rid, err)])
            return
        sc = BY_NUM.get(req.call) if isinstance(req.call, int) else BY_NAME.get(req.call)
        fwd = Forward(identity, req, sc.name if sc else str(req.call))
        try:
            fwd.user = self.users.authenticate(req.token)
        except SyscallError:
            return self.to_head(fwd)          # the head answers (and audits) a bad token
        try:
            self.users.check_key(fwd.user, curve.key_of(identity))
            self.route(fwd)
        except SyscallError as err:
            self.answer(fwd, err=err)
        except Exception as exc:              # a bug here must not take the front down
            log.error("front crashed on %r: %s", req.call, traceback.format_exc())
            self.answer(fwd, err=SyscallError("EIO", f"{type(exc).__name__}: {exc}"))

    def route(self, fwd: Forward) -> None:
        name = fwd.name
        if name in PID_CALLS:
            return self.by_pid(fwd)
        if name in ("spawn", "restore"):
            return self.place_and_spawn(fwd)
        if name in GATHER_CALLS or name in EVERY_KERNEL:
            return self.gather(fwd)
        if name in lifecycle.FRONT_CALLS:
            self.users.check_cap(fwd.user, BY_NAME[name].cap, name)     # the table's, as a kernel does
            return lifecycle.FRONT_CALLS[name](self, fwd)
        if name == "users_sync":
            raise SyscallError("EPERM", "a cluster's users are the head's: the front copies them itself")
        self.to_head(fwd)

    # -- calls about one process ---------------------------------------------------------------
    def by_pid(self, fwd: Forward) -> None:
        pid = fwd.req.args.get("pid")
        if self.pids.get(pid) is None:
            kept = self.kept.get(pid) if isinstance(pid, int) else None
            if kept is not None and (kept["uid"] == fwd.user.uid or fwd.user.is_root):
                return merge.answer_kept(self, fwd, kept)
            if not isinstance(pid, int) or isinstance(pid, bool):
                return self.to_head(fwd)      # the head says what is wrong with the arguments
            raise SyscallError("ESRCH", f"no process {pid}")
        fwd.gpid = pid
        self.issue(fwd)

    def issue(self, fwd: Forward) -> None:
        """(Re)send a call about ``fwd.gpid`` to where the process is now."""
        w = self.pids.get(fwd.gpid)
        if w is None:
            return self.by_pid(fwd)
        m = self.members.get(w.kernel)
        if m is None or m.state is MemberState.GONE:
            return self.answer(fwd, err=SyscallError("EHOSTDOWN", f"process {fwd.gpid}'s kernel is gone"))
        if m.state in (MemberState.DOWN, MemberState.JOINING):
            m.parked.append(fwd)              # asked again once Ray has restarted it
            return
        fwd.version, fwd.attempt = w.version, fwd.attempt + 1
        args, attempt = dict(fwd.req.args, pid=w.lpid), fwd.attempt
        if fwd.name == "read":
            args["since"] = (args.get("since") or 0) + fwd.num_tokens
            args["since_text"] = (args.get("since_text") or 0) + fwd.num_text
        self.note_session(fwd, w.kernel)
        self.ask(w.kernel, fwd.name, args, lambda env: self.on_pid_reply(fwd, w.kernel, attempt, env),
                 token=fwd.req.token, session=fwd.req.session, fwd=fwd)

    def on_pid_reply(self, fwd: Forward, kernel: int, attempt: int, env: dict) -> None:
        if attempt != fwd.attempt:
            return                            # from where the process was before it moved
        w = self.pids.get(fwd.gpid)
        if w is not None and w.version != fwd.version:
            return self.issue(fwd)
        if not env.get("ok"):
            return self.pass_on(fwd, env)
        result = translate(self.pids, fwd.name, kernel, env.get("result"), self.members[kernel].node)
        if fwd.name == "read" and isinstance(result, dict):
            fwd.num_tokens += len(result.get("token_ids") or ())
            fwd.num_text += len(result.get("text") or "")
        elif fwd.name == "wait":
            self.pids.drop(fwd.gpid)
            m = self.members[kernel]
            m.load = max(0, m.load - 1)           # until the next poll says how many live there
        elif fwd.name == "fork" and isinstance(result, list):
            for child in result:
                self.pids.where[child].uid = fwd.user.uid
                self.pids.where[child].placement = {"reason": "fork", "parent": fwd.gpid, "kernel": kernel}
        self.answer(fwd, result, more=bool(env.get("more")))

    # -- new processes ---------------------------------------------------------------------------
    def place_and_spawn(self, fwd: Forward) -> None:
        a, user = fwd.req.args, fwd.user
        if not user.is_root and self.pids.num_live(user.uid) >= self.cfg.max_procs_per_user:
            raise SyscallError("EAGAIN", f"process quota: user {user.name} has {self.pids.num_live(user.uid)} "
                                         f"of {self.cfg.max_procs_per_user} in the cluster")
        image = a.get("image") if isinstance(a.get("image"), dict) else {}
        key = prompt_key(a) if fwd.name == "spawn" else tuple(image.get("token_ids") or ())
        model = a.get("model") if fwd.name == "spawn" else (image.get("model") or {}).get("name")
        model = model if isinstance(model, str) else ""
        adapter = a.get("adapter") if fwd.name == "spawn" else (image.get("adapter") or {}).get("name")
        needs_head = a.get("path") is not None or (isinstance(adapter, str) and is_store_path(adapter))
        kernel, why = self.place(a.get("node"), key, model, needs_head)
        args = {k: v for k, v in a.items() if k != "node"}
        self.members[kernel].load += 1
        self.index.insert(kernel, key, model)     # now: the next spawn with this prefix follows it
        self.note_session(fwd, kernel)
        self.ask(kernel, fwd.name, args, lambda env: self.on_spawned(fwd, kernel, why, env),
                 token=fwd.req.token, session=fwd.req.session)

    def place(self, node: Any, key, model: str, needs_head: bool = False,
              exclude: int | None = None) -> tuple[int, dict]:
        ups = [m for m in self.members.values() if m.takes_spawns and m.kernel != exclude]
        if node is not None:
            pinned = [m for m in ups if str(node) in (str(m.kernel), m.node, m.info.get("node"))]
            if not pinned:
                raise SyscallError("EINVAL", f"no kernel up on node {node!r} (llmos cluster status lists them)")
            m = min(pinned, key=lambda m: m.load)
            return m.kernel, {"reason": "pinned", "kernel": m.kernel, "node": m.node}
        if needs_head:      # the file store exports adapters onto the head's node's disk
            head = self.members.get(HEAD)
            ups = [m for m in ups if head is not None and m.info.get("node") == head.info.get("node")]
            if not ups:
                raise SyscallError("EAGAIN", "no kernel on the head's node (the file store's) is up; try again")
        if not ups:
            raise SyscallError("EAGAIN", "no kernel of the cluster is up; try again")
        cands = [Candidate(m.kernel, m.load, not model or m.models.get(model) == "device") for m in ups]
        self.turn += 1
        kernel, why = choose(cands, self.index, key, model, self.policy, self.turn)
        return kernel, {**why, "kernel": kernel, "node": self.members[kernel].node}

    def on_spawned(self, fwd: Forward, kernel: int, why: dict, env: dict) -> None:
        if not env.get("ok"):
            return self.pass_on(fwd, env)
        gpid = self.pids.add(kernel, env["result"], fwd.user.uid, why)
        self.count(f"placed_{why['reason']}")
        self.answer(fwd, gpid)

    # -- every kernel, and the head -----------------------------------------------------------
    def gather(self, fwd: Forward) -> None:
        ups = [m.kernel for m in self.members.values() if m.state in (MemberState.UP, MemberState.DRAINING)]
        if not ups:
            raise SyscallError("EAGAIN", "no kernel of the cluster is up; try again")
        parts: dict[int, dict] = {}

        def on_part(kernel: int, env: dict) -> None:
            parts[kernel] = env
            if len(parts) == len(ups):
                merge.finish(self, fwd, parts)
        for k in ups:
            self.note_session(fwd, k)
            self.ask(k, fwd.name, fwd.req.args, lambda env, k=k: on_part(k, env), token=fwd.req.token,
                     session=fwd.req.session)

    def to_head(self, fwd: Forward) -> None:
        head = self.members.get(HEAD)
        if head is None or head.state not in (MemberState.UP, MemberState.DRAINING):
            return self.answer(fwd, err=SyscallError("EAGAIN", "the head kernel is restarting; try again"))
        if fwd.name in ("nop", "bye") and fwd.req.session:
            for k in self.sessions.get(fwd.req.session, ()):   # heartbeats reach every kernel it used
                if k != HEAD and k in self.members:
                    self.ask(k, fwd.name, {}, lambda env: None, token=fwd.req.token, session=fwd.req.session)
            if fwd.name == "bye":
                self.sessions.pop(fwd.req.session, None)
                self.session_seen.pop(fwd.req.session, None)
        self.note_session(fwd, HEAD)
        self.ask(HEAD, fwd.req.call, fwd.req.args, lambda env: self.on_head_reply(fwd, env), token=fwd.req.token,
                 session=fwd.req.session)

    def on_head_reply(self, fwd: Forward, env: dict) -> None:
        if fwd.name == "nop" and env.get("ok") and isinstance(env.get("result"), dict):
            env = {**env, "result": {**env["result"], "boot_id": self.boot_id}}   # the front's: it is the peer
        if fwd.name in USER_CHANGES and env.get("ok"):
            return lifecycle.sync_users(self, then=lambda: self.pass_on(fwd, env))
        self.pass_on(fwd, env)

    def note_session(self, fwd: Forward, kernel: int) -> None:
        if fwd.req.session and fwd.name != "bye":
            self.sessions.setdefault(fwd.req.session, set()).add(kernel)
            self.session_seen[fwd.req.session] = time.monotonic()

    def forget_sessions(self, older_than: float) -> None:
        """Sessions silent that long have ended on every kernel (HUP): stop tracking them."""
        cutoff = time.monotonic() - older_than
        for session in [s for s, t in self.session_seen.items() if t < cutoff]:
            self.sessions.pop(session, None)
            del self.session_seen[session]
