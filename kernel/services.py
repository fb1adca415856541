"""Services: out-of-kernel programs the kernel starts, routes calls to, and supervises.

Each start gets a fresh secret token (in the child's environment) that is its only identity;
the service registers the calls it serves with their argument schemas. A client's call to one
of them is authenticated, capability- and argument-checked here like any syscall, then
forwarded with the caller's verified identity; the service's ``svc_reply`` frames go back to
the client under the client's request id. A service that exits or misses heartbeats is marked
down (its calls answer ``EAGAIN``, its pending calls fail with ``EAGAIN``) and restarted with
exponential backoff. Plug-ins are services found in the ``llmos.services`` entry-point group.
"""
from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from enum import Enum

from llmos.kernel import audit
from llmos.kernel.procio import PENDING_REPLY
from llmos.kernel.security import User, hash_token
from llmos.syscalls.abi import encode_reply, encode_service_call
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import BY_NAME, Arg, Syscall, check_args

log = logging.getLogger("llmos.kernel")
HEARTBEAT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 120.0         # importing torch and replaying logs can take a while on a busy machine
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0
STABLE_S = 30.0                 # up this long: the next failure restarts fast again


class SvcState(Enum):
    STARTING = "starting"             # started, not registered yet
    UP = "up"
    DOWN = "down"                     # failed; restarts when ``restart_at`` comes
    STOPPED = "stopped"               # by request (or never started)


RUNNING_STATES = (SvcState.STARTING, SvcState.UP)


@dataclass
class ServiceProc:
    name: str
    state: SvcState = SvcState.STOPPED
    proc: subprocess.Popen | None = None
    token_hash: str = ""
    identity: bytes | None = None
    calls: dict[str, Syscall] = field(default_factory=dict)
    restarts: int = 0
    calls_served: int = 0
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    backoff: float = BACKOFF_MIN_S
    restart_at: float | None = None
    down_because: str = ""                # why it last went down
    attached: bool = False                # its host runs elsewhere (``attach``): never started nor restarted here

    @property
    def user(self) -> User:
        return User(f"svc:{self.name}", -1, frozenset({"svc"}))


@dataclass
class Pending:
    identity: bytes | None
    rid: object
    service: str
    on_reply: object = None        # the kernel's own request: called with (ok, result | SyscallError)
    last_heard: float = field(default_factory=time.monotonic)   # sent, or its last frame


class ServiceManager:
    """Given the kernel's config, the outbox, and the model manager (services hold memory
    leases); ``on_memory_back`` runs when a service's leases die with it."""

    def __init__(self, cfg, outbox, models=None, on_memory_back=lambda: None):
        self.cfg, self.outbox, self.models, self.on_memory_back = cfg, outbox, models, on_memory_back
        self.services: dict[str, ServiceProc] = {}
        self.by_token: dict[str, ServiceProc] = {}
        self.routes: dict[str, ServiceProc] = {}          # call name -> the service serving it
        self.pending: dict[int, Pending] = {}             # forwarded call id -> where the reply goes
        self.next_kid = 1
        self.upstream = None                              # a cluster kernel's head (``kernel/upstream.py``)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, name: str) -> ServiceProc:
        svc = self.services.setdefault(name, ServiceProc(name))
        if svc.state in RUNNING_STATES:
            raise SyscallError("EBUSY", f"service {name} is already running")
        self._drop_token(svc)
        token = "svc_" + secrets.token_urlsafe(32)
        svc.token_hash = hash_token(token)
        self.by_token[svc.token_hash] = svc
        data_dir = self.cfg.state_dir / "services" / name
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {**os.environ, "LLMOS_SOCKET": self.cfg.socket, "LLMOS_SERVICE_TOKEN": token,
               "LLMOS_SERVICE_DIR": str(data_dir)}
        out = open(data_dir / "service.log", "ab")
        svc.proc = subprocess.Popen([sys.executable, "-m", "llmos.services.run", name], env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        svc.state, svc.started_at, svc.last_heartbeat, svc.restart_at = SvcState.STARTING, time.monotonic(), time.monotonic(), None
        log.info("service %s started (pid %d)", name, svc.proc.pid)
        return svc

    def attach(self, name: str) -> str:
        """A service whose host runs elsewhere (another machine, over CURVE): a token for it to
        register with, like one the kernel starts. It is not restarted here: when it goes down
        (missed heartbeats, ``svc_stop``) its token is dropped and its host must be attached anew."""
        svc = self.services.get(name)
        if svc is not None and svc.state in RUNNING_STATES:
            raise SyscallError("EBUSY", f"service {name} is already running")
        svc = self.services[name] = ServiceProc(name, attached=True)
        token = "svc_" + secrets.token_urlsafe(32)
        svc.token_hash = hash_token(token)
        self.by_token[svc.token_hash] = svc
        svc.state, svc.started_at, svc.last_heartbeat = SvcState.STARTING, time.monotonic(), time.monotonic()
        log.info("service %s attached: waiting for its host to register", name)
        return token

    def stop(self, name: str) -> None:
        svc = self.services.get(name)
        if svc is None:
            raise SyscallError("ENOENT", f"no service {name}")
        self._down(svc, "stopped by request", restart=False)

    def stop_all(self) -> None:
        for svc in self.services.values():
            self._down(svc, "kernel shutting down", restart=False)

    def tick(self) -> None:
        """Housekeeping each loop turn: notice dead or silent services, restart due ones."""
        now = time.monotonic()
        limit = self.cfg.service_call_timeout
        for kid, p in list(self.pending.items()):       # a service that never answers a call
            if now - p.last_heard > limit:
                del self.pending[kid]
                self._fail(p, SyscallError("ETIMEDOUT", f"service {p.service} did not answer within {limit:g}s"))
        mm = self.models
        if mm is not None and mm.leases.leases and mm.leases.expire():
            self.on_memory_back()
        for svc in self.services.values():
            if svc.state in RUNNING_STATES:
                up = svc.state is SvcState.UP
                if svc.proc is not None and svc.proc.poll() is not None:
                    self._down(svc, f"exited with {svc.proc.returncode}")
                elif now - svc.last_heartbeat > (HEARTBEAT_TIMEOUT_S if up else START_TIMEOUT_S):
                    self._down(svc, "missed heartbeats" if up else "did not register in time",
                               restart=not svc.attached)
            elif svc.state is SvcState.DOWN and svc.restart_at is not None and now >= svc.restart_at:
                svc.restarts += 1
                audit.event("service_restart", service=svc.name, restarts=svc.restarts, why=svc.down_because)
                self.start(svc.name)

    def _down(self, svc: ServiceProc, why: str, restart: bool = True) -> None:
        svc.down_because = why
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()
        self._drop_token(svc)
        if not restart:        # while a restart is due, its calls stay known and answer EAGAIN
            for name in list(svc.calls):
                self.routes.pop(name, None)
        for kid, p in list(self.pending.items()):
            if p.service == svc.name:
                del self.pending[kid]
                self._fail(p, SyscallError("EAGAIN", f"service {svc.name} went down: {why}"))
        if time.monotonic() - svc.started_at > STABLE_S:
            svc.backoff = BACKOFF_MIN_S
        if self.models is not None:               # its memory leases die with it
            self.models.leases.drop_holder(svc.user.name)
            self.on_memory_back()
        svc.state, svc.identity = (SvcState.DOWN if restart else SvcState.STOPPED), None
        svc.restart_at = time.monotonic() + svc.backoff if restart else None
        svc.backoff = min(BACKOFF_MAX_S, svc.backoff * 2)
        log.warning("service %s down (%s)%s", svc.name, why, f"; restart in {svc.restart_at - time.monotonic():.1f}s"
                    if restart else "")

    def _fail(self, p: Pending, err: SyscallError) -> None:
        p.on_reply(False, err) if p.on_reply else self.outbox.error(p.identity, p.rid, err)

    def num_down(self) -> int:
        return sum(1 for s in self.services.values() if s.state is SvcState.DOWN)

    def _drop_token(self, svc: ServiceProc) -> None:
        self.by_token.pop(svc.token_hash, None)
        svc.token_hash = ""

    # -- requests from services ---------------------------------------------------------------
    def authenticate(self, token: str | None) -> ServiceProc | None:
        return self.by_token.get(hash_token(token)) if token else None

    def register(self, svc: ServiceProc, identity: bytes, calls: list) -> int:
        table = {}
        for c in calls:
            sc = _syscall_of(c, svc.name)
            owner = self.routes.get(sc.name)
            if sc.name in BY_NAME or (owner is not None and owner is not svc):
                raise SyscallError("EEXIST", f"call {sc.name} is already served by "
                                             f"{'the kernel' if sc.name in BY_NAME else owner.name}")
            table[sc.name] = sc
        svc.calls, svc.identity, svc.state = table, identity, SvcState.UP
        svc.last_heartbeat = time.monotonic()
        self.routes.update({name: svc for name in table})
        log.info("service %s up: %s", svc.name, sorted(table))
        return len(table)

    def heartbeat(self, svc: ServiceProc) -> None:
        svc.last_heartbeat = time.monotonic()

    def relay(self, svc: ServiceProc, args: dict) -> None:
        """A service's reply frame, forwarded to the client that made the call."""
        p = self.pending.get(args.get("id"))
        if p is None or p.service != svc.name:
            return                                     # its client went away or the call was failed
        if p.on_reply is not None:                     # the kernel asked (one frame answers)
            del self.pending[args["id"]]
            svc.calls_served += 1
            ok = bool(args.get("ok"))
            p.on_reply(ok, args.get("result") if ok else SyscallError.from_wire(args.get("error")))
            return
        p.last_heard = time.monotonic()
        if args.get("ok"):
            self.outbox.send(p.identity, encode_reply(p.rid, args.get("result"), bool(args.get("more"))))
        else:
            self.outbox.error(p.identity, p.rid, SyscallError.from_wire(args.get("error")))
        if not args.get("ok") or not args.get("more"):
            del self.pending[args["id"]]
            svc.calls_served += 1

    # -- calls from clients -------------------------------------------------------------------
    def lookup(self, name) -> Syscall | None:
        svc = self.routes.get(name) if isinstance(name, str) else None
        return svc.calls[name] if svc is not None else None

    def forward(self, call) -> None:
        """A client's call to a service: the reply frames go straight back to the client."""
        self._send(call.sc.name, call.args, call.user, Pending(call.identity, call.rid, ""))

    def ask(self, name: str, args: dict, user: User, on_reply) -> None:
        """The kernel's own call to a service on behalf of ``user`` (e.g. facts for a spawn);
        ``on_reply(ok, result | SyscallError)`` runs on the loop when the answer comes."""
        sc = self.lookup(name)
        if sc is None and self.upstream is not None:      # a cluster kernel: the head runs it
            return self.upstream.ask(name, args, user, on_reply)
        self._send(name, check_args(sc, args) if sc else args, user, Pending(None, None, "", on_reply))

    def _send(self, name: str, args: dict, user: User, pending: Pending) -> None:
        svc = self.routes.get(name)
        if svc is None or svc.state is not SvcState.UP:
            raise SyscallError("EAGAIN", f"{name}: its service is not running; try again shortly")
        kid, self.next_kid = self.next_kid, self.next_kid + 1
        pending.service = svc.name
        self.pending[kid] = pending
        caller = {"uid": user.uid, "user": user.name, "caps": sorted(user.caps)}
        self.outbox.send(svc.identity, encode_service_call(kid, name, args, caller))

    def rows(self) -> list[dict]:
        now = time.monotonic()
        return [{"name": s.name, "pid": s.proc.pid if s.proc and s.state in RUNNING_STATES else None,
                 "state": s.state.value, "restarts": s.restarts, "calls_served": s.calls_served,
                 "calls": sorted(s.calls), "uptime_s": round(now - s.started_at, 1) if s.state is SvcState.UP else 0}
                for s in self.services.values()]


def answer_later(k, call, work):
    """An ``ask`` reply handler: ``work(result)`` answers ``call`` (or returns ``PENDING_REPLY``
    when a further step will); a refusal or a bug in ``work`` answers with an error. The answer
    to a journaled call waits for the journal, as it would have without the service."""
    def on_reply(ok: bool, result) -> None:
        try:
            if not ok:
                raise result
            out = work(result)
            if out is not PENDING_REPLY:
                journal = getattr(k, "journal", None)
                k.outbox.reply(call, out, held=call.sc.journaled and journal is not None and journal.enabled)
        except SyscallError as err:
            k.outbox.fail(call, err)
        except Exception as exc:             # one call's bug never reaches the loop
            log.exception("%s failed after a service's answer", call.sc.name)
            k.outbox.fail(call, SyscallError("EIO", f"{type(exc).__name__}: {exc}"))
    return on_reply


def _syscall_of(c: dict, service: str) -> Syscall:
    """A registered call's schema, checked like the kernel's own table entries."""
    try:
        args = tuple(Arg(a["name"], a["type"], bool(a.get("required")), a.get("default"), a.get("min"),
                         a.get("max"), a.get("max_len"), tuple(a["choices"]) if a.get("choices") else None,
                         a.get("doc", "")) for a in c.get("args", []))
        if not isinstance(c["name"], str) or not c["name"]:
            raise ValueError("a call needs a name")
        return Syscall(-1, c["name"], args, cap=c.get("cap"), served_by=service, stream=bool(c.get("stream")),
                       doc=c.get("doc", ""), returns=c.get("returns", ""))
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        raise SyscallError("EINVAL", f"bad call schema from service {service}: {exc!r}"[:300])
