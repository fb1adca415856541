"""The service base: an ordinary program that serves some calls of the ABI.

A service declares its calls in a table of its own (``Syscall``/``Arg`` from the syscall
table module, like the kernel's), maps each name to a method in ``handlers()``, and runs::

    class Echo(Service):
        name = "echo"
        calls = (Syscall(0, "echo", (Arg("text", "str", required=True),), cap="fs"),)
        def handlers(self):
            return {"echo": self.echo}
        def echo(self, caller, text):
            return text

The kernel starts it (``python -m llmos.services.run NAME``) with ``LLMOS_SOCKET`` and a
one-time ``LLMOS_SERVICE_TOKEN`` in the environment. A plug-in host on another machine runs the
same command with the token ``svc_attach`` gave, ``LLMOS_SOCKET=tcp://…``, the kernel's
``LLMOS_SERVER_KEY`` (CURVE) and ``LLMOS_SERVICE_ATTACHED=1``. The service registers its table, then
receives ``{"id", "call", "args", "caller": {uid, user, caps}}`` messages (arguments already
checked against its schema by the kernel, the caller already authenticated) and answers each
with ``svc_reply``; a handler may also yield several results (a stream). Calls named in
``threaded`` run on worker threads (their handlers may block, e.g. on the kernel) while the
loop keeps serving and heartbeating; their replies go out through the loop's socket. It sends
``svc_heartbeat`` every ``HEARTBEAT_S`` seconds; the kernel restarts a service that misses them.
"""
from __future__ import annotations

import logging
import os
import queue
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import zmq

from llmos.syscalls import abi
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import Syscall

HEARTBEAT_S = 1.0
log = logging.getLogger("llmos.service")


def schema_of(sc: Syscall) -> dict:
    """A call's declaration as it travels in ``svc_register``."""
    return {"name": sc.name, "cap": sc.cap, "stream": sc.stream, "doc": sc.doc, "returns": sc.returns,
            "args": [{"name": a.name, "type": a.type, "required": a.required, "default": a.default,
                      "min": a.min, "max": a.max, "max_len": a.max_len,
                      "choices": list(a.choices) if a.choices else None, "doc": a.doc} for a in sc.args]}


class Service:
    name: str = ""
    calls: tuple[Syscall, ...] = ()
    threaded: frozenset[str] = frozenset()   # calls whose handlers may block: run on worker threads

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """Call name -> method(caller, **args). Explicit: wire names are never looked up with getattr."""
        return {}

    def setup(self) -> None:
        """Open files, replay logs: runs before registering, so calls only arrive when ready."""

    def kernel_client(self, timeout: float = 60.0):
        """A new ABI client with this service's identity, for calls of its own: ``mm_lease``,
        or ``svc_call`` to use another service as a user (built-ins, or plug-ins started with
        ``--delegate``). One per thread; never from a handler to this same service."""
        from llmos.syscalls.client import connect
        return connect(os.environ["LLMOS_SOCKET"], os.environ["LLMOS_SERVICE_TOKEN"], timeout=timeout)

    # -- the receive/reply loop ---------------------------------------------------------------
    def run(self, socket: str | None = None, token: str | None = None) -> None:
        socket = socket or os.environ["LLMOS_SOCKET"]
        token = token or os.environ["LLMOS_SERVICE_TOKEN"]
        self.setup()
        table = self.handlers()
        missing = [sc.name for sc in self.calls if sc.name not in table]
        assert not missing, f"{self.name}: calls without a handler: {missing}"
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        if socket.startswith("tcp://") and os.environ.get("LLMOS_SERVER_KEY"):    # a host on another machine
            from llmos.syscalls.remote import Curve
            Curve(os.environ["LLMOS_SERVER_KEY"]).apply(sock)
        sock.connect(socket)
        self._sock, self._token, self._rid = sock, token, 0
        self._request("svc_register", {"name": self.name, "calls": [schema_of(sc) for sc in self.calls],
                                       "pid": os.getpid()})
        next_beat = time.monotonic() + HEARTBEAT_S
        kernel_pid = os.getppid()        # the kernel started us: when it is gone, so are we
        attached = bool(os.environ.get("LLMOS_SERVICE_ATTACHED"))   # ...unless we run elsewhere (svc_attach)
        self._done: queue.SimpleQueue = queue.SimpleQueue()     # replies from worker threads
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{self.name}-call")
        self._busy = 0
        while True:
            wait = next_beat - time.monotonic()
            if sock.poll(max(1, int((min(wait, 0.02) if self._busy else wait) * 1000))):
                try:
                    kind, msg = abi.decode_service_frame(sock.recv())
                except SyscallError as err:             # not ours to answer: note it, go on
                    log.error("%s: %s", self.name, err.message)
                    continue
                if kind == abi.SERVICE_CALL:
                    if msg["call"] in self.threaded:
                        self._busy += 1
                        self._workers.submit(self._serve, table, msg, lambda *r: self._done.put(r))
                    else:
                        self._serve(table, msg, self._reply)
                elif msg.get("ok") is False and msg.get("error", {}).get("errno") == "EACCES":
                    return                      # our token was revoked: the kernel replaced us
            while not self._done.empty():       # the socket is this thread's: workers hand replies over
                kid, ok, payload, more = self._done.get()
                self._busy -= not more
                self._reply(kid, ok, payload, more)
            if time.monotonic() >= next_beat:
                if not attached and os.getppid() != kernel_pid:
                    log.warning("%s: its kernel (pid %d) is gone; exiting", self.name, kernel_pid)
                    return
                self._request("svc_heartbeat", {"name": self.name})
                next_beat = time.monotonic() + HEARTBEAT_S

    def _serve(self, table: dict, msg: dict, send) -> None:
        """Run one call and ``send(kid, ok, payload, more)`` each frame of its answer."""
        kid, call, caller = msg["id"], msg["call"], msg["caller"]
        try:
            out = table[call](caller, **msg.get("args", {}))
            if isinstance(out, Iterator):
                for item in out:
                    send(kid, True, item, True)
                send(kid, True, None, False)
            else:
                send(kid, True, out, False)
        except SyscallError as err:
            send(kid, False, err.to_wire(), False)
        except Exception as exc:          # a bug answers EIO; the service keeps serving
            log.error("%s.%s crashed: %s", self.name, call, traceback.format_exc())
            send(kid, False, SyscallError("EIO", f"{type(exc).__name__}: {exc}").to_wire(), False)

    def _reply(self, kid: int, ok: bool, payload: Any, more: bool = False) -> None:
        args = {"id": kid, "ok": ok, "more": more, ("result" if ok else "error"): payload}
        self._request("svc_reply", args)

    def _request(self, call: str, args: dict) -> None:
        self._rid += 1
        self._sock.send(abi.encode_request(self._rid, call, args, self._token))
