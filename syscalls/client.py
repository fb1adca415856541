"""The client stub: ``connect()`` returns a ``Client`` whose methods are the table's calls.

A Client owns one DEALER socket and is meant for one thread (make one per thread). Every call
has a timeout; a blocking call (``wait``, ``read``) probes the kernel while it waits, so a dead
kernel gives ``ETIMEDOUT`` and a restarted one ``ECONNRESET`` instead of a hang — except that
``read`` and ``wait`` themselves wait for a restarted kernel and go on (it restores its processes
from its journal): ``read`` from the last token it yielded. A request
larger than the kernel's frame limit fails at once with ``EMSGSIZE`` and is not sent. A kernel on
another machine is reached over CURVE (``connect(server_key=…)`` or a named remote; keys and
remotes in ``syscalls/remote.py``).
"""
from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from typing import Any, Iterator

import zmq

from llmos.syscalls import abi, locate
from llmos.syscalls import remote as remotes
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import SYSCALLS, Syscall, lookup

DEFAULT_TIMEOUT = 30.0      # seconds for an ordinary call
PROBE_EVERY = 2.0           # seconds of silence before a blocking call checks the kernel is alive
CONNECT_TIMEOUT = 5.0       # seconds to wait for a connection before ECONNREFUSED
ASK_LIMIT_ABOVE = 64 * 1024  # bytes: a larger request first learns the kernel's frame limit (one nop)
SESSION_CALLS = ("spawn", "fork", "restore")   # make processes of this session: heartbeats start
RESUME_TIMEOUT = 120.0      # seconds read and wait wait for a restarted kernel (it restores processes)


class Client:
    """A connection to a kernel. Methods named after the syscalls are generated from the table."""

    def __init__(self, socket: str, token: str | None, timeout: float = DEFAULT_TIMEOUT,
                 max_frame: int | None = None, curve: remotes.Curve | None = None):
        self.endpoint = socket
        self.token = token
        self.timeout = timeout
        self.max_frame = max_frame                  # the kernel's frame limit; None until learned
        self._ids = itertools.count(1)
        self._ctx = zmq.Context.instance()
        self._curve = curve                         # CURVE keys, for a kernel on another machine
        self._sock = self._socket()
        self._sock.setsockopt(zmq.IMMEDIATE, 1)    # never queue requests for a kernel that isn't there
        if curve is None:
            self._sock.connect(socket)
        else:
            try:
                remotes.check_handshake(self._sock, socket, lambda: self._sock.connect(socket))
            except SyscallError:
                self._sock.close(0)
                raise
        # A session: named in every request, kept alive by a heartbeat thread (its own socket),
        # ended by close() with a goodbye. Ending without one (a crash) hangs up its processes.
        self.session = secrets.token_hex(8)
        self._heartbeat: threading.Thread | None = None
        self._closing = threading.Event()
        self._boot_id: str | None = None
        self._inflight: set[int] = set()            # pipelined requests not yet answered
        self._early: dict[int, dict] = {}           # their replies that came before their turn

    # -- the generic call -------------------------------------------------------------------
    def call(self, name: str | int, /, *, _timeout: float | None = None, **args) -> Any:
        """Make one call and return its result (a streamed call returns the final frame)."""
        sc = lookup(name) if _is_known(name) else None
        if sc is not None and sc.stream:
            last = None
            for last in self.stream(name, _timeout=_timeout, **args):
                pass
            return last
        rid = self._send(name, args)
        blocking = sc is not None and sc.blocking
        return self._recv(rid, _timeout, blocking)[0]

    def stream(self, name: str | int, /, *, _timeout: float | None = None, **args) -> Iterator[Any]:
        """Yield every frame's result of a streamed call, the final one last."""
        rid = self._send(name, args)
        while True:
            result, more = self._recv(rid, _timeout, blocking=True)
            yield result
            if not more:
                return

    def pipeline(self, name: str | int, args_seq, /, *, window: int = 4,
                 _timeout: float | None = None) -> Iterator[Any]:
        """Make the call ``name`` once per argument map in ``args_seq`` with up to ``window``
        requests in flight, and yield the results in order — e.g. the chunks of an upload, so
        sending the next overlaps the kernel and the service handling this one. The first
        error raises; requests already sent are still answered, and their replies dropped."""
        pending: list[int] = []
        args_iter = iter(args_seq)
        try:
            while True:
                while len(pending) < window and (args := next(args_iter, None)) is not None:
                    rid = self._send(name, args)
                    self._inflight.add(rid)
                    pending.append(rid)
                if not pending:
                    return
                rid = pending.pop(0)
                try:
                    result = self._recv(rid, _timeout, blocking=False)[0]
                finally:
                    self._inflight.discard(rid)
                yield result
        finally:
            for rid in pending:
                self._inflight.discard(rid)
                self._early.pop(rid, None)

    # -- calls that outlive a kernel restart ---------------------------------------------------
    def read(self, pid: int, since: int = 0, since_text: int = 0, *, _timeout: float | None = None,
             resume: float = RESUME_TIMEOUT) -> Iterator[dict]:
        """Stream a process's current turn (the ``read`` syscall). Across a kernel restart it
        resumes by itself (for up to ``resume`` seconds of the kernel being away; 0: never),
        asking from the last token and character it yielded, so each is yielded once."""
        deadline = None
        while True:
            try:
                for frame in self.stream("read", pid=pid, since=since, since_text=since_text, _timeout=_timeout):
                    since += len(frame.get("token_ids") or ())
                    since_text += len(frame.get("text") or "")
                    deadline = None
                    yield frame
                return
            except SyscallError as err:
                deadline = self._await_restart(err, resume, deadline)

    def wait(self, pid: int, timeout: float | None = None, *, _timeout: float | None = None,
             resume: float = RESUME_TIMEOUT) -> dict:
        """Wait for a process to end and reap it (the ``wait`` syscall), across kernel restarts
        as ``read`` does."""
        deadline = None
        while True:
            try:
                return self.call("wait", pid=pid, timeout=timeout, _timeout=_timeout)
            except SyscallError as err:
                deadline = self._await_restart(err, resume, deadline)

    def _await_restart(self, err: SyscallError, resume: float, deadline: float | None) -> float:
        """After ``err`` on a blocking call: re-raise it unless it says the kernel went away
        and ``resume`` allows waiting for one to answer again; then forget the old kernel."""
        if not resume or err.errno not in ("ECONNRESET", "ECONNREFUSED"):
            raise err
        deadline = deadline or time.monotonic() + resume
        while True:
            if time.monotonic() > deadline:
                raise err
            try:
                self._boot_id = None
                self._learn(self.call("nop", _timeout=min(self.timeout, 2.0)))
                return deadline
            except SyscallError:
                time.sleep(0.2)

    def close(self) -> None:
        """Say goodbye (the session's processes are not hung up) and close."""
        self._closing.set()
        if self._heartbeat is not None:
            try:
                self._sock.send(abi.encode_request(next(self._ids), "bye", {}, self.token, self.session),
                                zmq.NOBLOCK)
                self._sock.poll(1000, zmq.POLLIN)          # the goodbye's answer, or give up
            except zmq.ZMQError:
                pass
            self._heartbeat.join(5)
        self._sock.close(0)

    def _start_heartbeat(self, every: float) -> None:
        if self._heartbeat is None and every > 0:
            self._heartbeat = threading.Thread(target=self._beat, args=(every,), name="llmos-heartbeat",
                                               daemon=True)
            self._heartbeat.start()

    def _socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            self._curve.apply(sock)
        return sock

    def _beat(self, every: float) -> None:
        sock = self._socket()
        sock.connect(self.endpoint)
        try:
            while not self._closing.wait(every):
                try:
                    sock.send(abi.encode_request(0, "nop", {}, self.token, self.session), zmq.NOBLOCK)
                    while sock.poll(0, zmq.POLLIN):
                        sock.recv()
                except zmq.ZMQError:
                    pass
        finally:
            sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- wire ---------------------------------------------------------------------------------
    def _send(self, name, args) -> int:
        sc = lookup(name) if _is_known(name) else None
        if sc is not None and (sc.blocking or sc.name in SESSION_CALLS) and self._boot_id is None:
            # Learn which kernel we talk to, so a restart during the wait is noticed.
            self._learn(self.call("nop"))
        rid = next(self._ids)
        frame = abi.encode_request(rid, name, _plain(args), self.token, self.session)
        if len(frame) > ASK_LIMIT_ABOVE and self.max_frame is None:
            self._learn(self.call("nop"))
        if self.max_frame is not None and len(frame) > self.max_frame:
            raise SyscallError("EMSGSIZE", f"request is {len(frame)} bytes; the kernel's frame limit is "
                                           f"{self.max_frame} (not sent)")
        if locate.is_ipc(self.endpoint) and not os.path.exists(locate.ipc_path(self.endpoint)):
            raise SyscallError("ECONNREFUSED", f"no kernel listening at {self.endpoint} "
                                               f"(start one with `llmos kernel start`)")
        if not self._sock.poll(int(CONNECT_TIMEOUT * 1000), zmq.POLLOUT):
            raise SyscallError("ECONNREFUSED", f"could not reach a kernel at {self.endpoint}")
        self._sock.send(frame)
        return rid

    def _learn(self, nop: dict) -> None:
        """Remember which kernel we talk to and its frame limit, from a nop's result."""
        self._boot_id = nop["boot_id"]
        self._start_heartbeat(nop.get("session_timeout", 0) / 3)
        if self.max_frame is None:
            self.max_frame = nop.get("max_frame", abi.MAX_FRAME_BYTES)   # older kernels: the default

    def _recv(self, rid: int, timeout: float | None, blocking: bool) -> tuple[Any, bool]:
        """Wait for the next frame of request ``rid``; stale frames of older requests are dropped."""
        limit = None if (blocking and timeout is None) else (timeout or self.timeout)
        start = last_heard = time.monotonic()
        early = self._early.pop(rid, None)
        if early is not None:
            if not early.get("ok"):
                raise SyscallError.from_wire(early.get("error"))
            return early.get("result"), bool(early.get("more"))
        while True:
            now = time.monotonic()
            if limit is not None and now - start > limit:
                raise SyscallError("ETIMEDOUT", f"no reply from the kernel in {limit:.1f}s")
            slice_s = PROBE_EVERY if limit is None else min(PROBE_EVERY, limit - (now - start))
            env = None
            if self._sock.poll(max(1, int(slice_s * 1000)), zmq.POLLIN):
                env = abi.decode_reply(self._sock.recv())
                last_heard = time.monotonic()
            elif blocking and time.monotonic() - last_heard >= PROBE_EVERY:
                env = self._probe(rid)
                last_heard = time.monotonic()
            if env is not None and env.get("id") == rid:
                if not env.get("ok"):
                    raise SyscallError.from_wire(env.get("error"))
                return env.get("result"), bool(env.get("more"))
            if env is not None and env.get("id") in self._inflight:
                self._early[env["id"]] = env           # a pipelined request's: kept for its turn

    def _probe(self, pending_rid: int) -> dict | None:
        """Check that the kernel that owns our pending call is still the one running.

        Returns the pending call's own reply if it arrives meanwhile, else None."""
        probe_rid = next(self._ids)
        self._sock.send(abi.encode_request(probe_rid, "nop", {}, self.token, self.session))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if not self._sock.poll(100, zmq.POLLIN):
                continue
            env = abi.decode_reply(self._sock.recv())
            if env.get("id") == pending_rid:   # the real reply overtook the probe
                return env
            if env.get("id") == probe_rid:
                boot_id = (env.get("result") or {}).get("boot_id") if env.get("ok") else None
                if self._boot_id is None:
                    self._boot_id = boot_id
                elif boot_id != self._boot_id:
                    raise SyscallError("ECONNRESET", "the kernel restarted; the pending call was lost")
                return None
        raise SyscallError("ETIMEDOUT", f"the kernel stopped answering ({self.timeout:.0f}s)")

    def __repr__(self):
        return f"<llmos.Client {self.endpoint}>"


def _is_known(name) -> bool:
    try:
        lookup(name)
        return True
    except SyscallError:
        return False


def _plain(args: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items() if v is not None}


def _make_stub(sc: Syscall):
    names = [a.name for a in sc.args]

    def stub(self, *pos, _timeout: float | None = None, **kw):
        if len(pos) > len(names):
            raise TypeError(f"{sc.name}() takes at most {len(names)} positional arguments")
        kw.update(zip(names, pos))
        if sc.stream:
            return self.stream(sc.name, _timeout=_timeout, **kw)
        return self.call(sc.name, _timeout=_timeout, **kw)

    arglist = ", ".join(("" if a.required else "[") + a.name + ("" if a.required else "]") for a in sc.args)
    stub.__name__ = sc.name
    stub.__doc__ = f"{sc.name}({arglist}) -> {sc.returns}\n\n{sc.doc}"
    return stub


for _sc in SYSCALLS:
    if _sc.name in ("read", "wait"):          # written out above: they resume across restarts
        getattr(Client, _sc.name).__doc__ += f"\n\n{_make_stub(_sc).__doc__}"
    else:
        setattr(Client, _sc.name, _make_stub(_sc))


def connect(socket: str | None = None, token: str | None = None, timeout: float = DEFAULT_TIMEOUT, *,
            server_key: str | None = None, client_key: str | None = None, remote: str | None = None) -> Client:
    """Connect to a kernel.

    ``socket``: a ZeroMQ endpoint (``ipc://…`` or ``tcp://…``); default ``$LLMOS_SOCKET``, else
    the local kernel's socket under ``$LLMOS_STATE_DIR`` (default ``~/.llmos``).
    ``token``: default ``$LLMOS_TOKEN``, else the token saved for the local user.
    ``server_key``: the kernel's CURVE public key (Z85, or its ``server.key`` file; default
    ``$LLMOS_SERVER_KEY``): with it, a ``tcp://`` endpoint is reached over CURVE, with this
    client's key pair (``client_key``, a ``.key_secret`` file; default ``$LLMOS_CLIENT_KEY`` or
    one made under ``~/.config/llmos``). A wrong key is an ``ECONNREFUSED`` within 2 s.
    ``remote``: a name saved with ``llmos remote add`` (default ``$LLMOS_REMOTE``): its endpoint,
    server key and token, unless given here.
    """
    name = remote or (os.environ.get("LLMOS_REMOTE") if not socket else None)
    saved = remotes.remote(name) if name else {}
    socket = socket or saved.get("endpoint") or os.environ.get("LLMOS_SOCKET") or locate.default_socket()
    token = token or saved.get("token") or os.environ.get("LLMOS_TOKEN") or locate.saved_token()
    server_key = server_key or saved.get("server_key") or (os.environ.get("LLMOS_SERVER_KEY") or None)
    curve = None
    if socket.startswith("tcp://") and server_key:
        curve = remotes.Curve(server_key, client_key)
    elif socket.startswith("tcp://") and not locate.is_loopback(socket):
        raise SyscallError("EINVAL", f"{socket} is another machine: give the kernel's public key (server_key= or "
                                     f"$LLMOS_SERVER_KEY; `llmos kernel key` prints it there)")
    return Client(socket, token, timeout=timeout, curve=curve)

