"""The kernel's I/O thread: owns the client-facing ROUTER socket.

The thread runs ``zmq.proxy_steerable`` (a C loop that holds no GIL) between the ROUTER and an
inproc PAIR; the kernel loop reads and writes the other end of that PAIR. Frames travel as
``[routing_id, payload]``. The kernel loop refuses a frame over ``max_frame`` with EMSGSIZE; the
socket itself (``MAXMSGSIZE``) only enforces the hard cap ``abi.socket_frame_cap(max_frame)``: a
frame over that makes ZeroMQ drop the connection, which the monitor reports as a disconnect.

With ``curve`` (an endpoint), a second, CURVE-encrypted ROUTER serves other machines
(``kernel/curve.py``); ``channel`` then takes frames from both and sends each reply back the way
its request came.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import zmq

from llmos.kernel import curve as curve_mod
from llmos.kernel.security import make_private_dir, own_subdir
from llmos.syscalls import abi, locate


class Channel:
    """The kernel loop's end of the I/O: ``recv_multipart`` takes the next frame from either
    socket (in turn), ``send_multipart`` answers on the socket its routing id came from."""

    def __init__(self, local, curve=None):
        self.ends = [local] + ([curve] if curve is not None else [])
        self._turn = 0

    def recv_multipart(self, flags: int = 0):
        for i in range(len(self.ends)):
            end = self.ends[(self._turn + i) % len(self.ends)]
            try:
                frames = end.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            self._turn += 1
            return frames
        raise zmq.Again()

    def send_multipart(self, frames) -> None:
        remote = len(self.ends) > 1 and frames[0].startswith(curve_mod.PREFIX)
        self.ends[-1 if remote else 0].send_multipart(frames)


class IOThread:
    def __init__(self, endpoint: str, max_frame: int, ctx: zmq.Context | None = None, curve: str | None = None,
                 state: Path | None = None):
        self.endpoint = endpoint
        self.ctx = ctx or zmq.Context.instance()
        self._name = f"inproc://llmos-io-{id(self)}"
        self.router = bind_router(self.ctx, endpoint, max_frame)
        self.monitor = self.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._back = self.ctx.socket(zmq.PAIR)
        self._back.setsockopt(zmq.LINGER, 0)
        self._back.bind(self._name)
        #: the kernel loop's end: recv_multipart() -> [routing_id, frame]; send_multipart likewise
        self.kernel_end = self.ctx.socket(zmq.PAIR)
        self.kernel_end.setsockopt(zmq.LINGER, 0)
        self.kernel_end.connect(self._name)
        self._ctl_name = self._name + "-ctl"
        self._ctl = self.ctx.socket(zmq.PAIR)
        self._ctl.bind(self._ctl_name)
        self._thread = threading.Thread(target=self._run, name="llmos-io", daemon=True)
        self.curve = curve_mod.CurveEndpoint(self.ctx, curve, state, max_frame) if curve else None
        self.channel = Channel(self.kernel_end, self.curve)
        #: what the loop polls: the ends it reads frames from, and the monitors
        self.sockets = [self.kernel_end, self.monitor] + ([self.curve.router, self.curve.monitor]
                                                           if self.curve else [])

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        ctl = self.ctx.socket(zmq.PAIR)
        ctl.connect(self._ctl_name)
        try:
            zmq.proxy_steerable(self.router, self._back, None, ctl)
        except zmq.ContextTerminated:
            pass
        finally:
            ctl.close(0)

    def stop(self) -> None:
        """Stop the proxy, close every socket, remove the ipc socket file."""
        if self.curve:
            self.curve.stop()
        if self._thread.is_alive():
            time.sleep(0.05)           # let the proxy forward replies already queued to it
            self._ctl.send(b"TERMINATE")
            self._thread.join(timeout=5)
        self.router.disable_monitor()
        for s in (self.monitor, self.kernel_end, self._back, self._ctl, self.router):
            s.close(0)
        if locate.is_ipc(self.endpoint):
            try:
                os.unlink(locate.ipc_path(self.endpoint))
            except FileNotFoundError:
                pass


def bind_router(ctx: zmq.Context, endpoint: str, max_frame: int) -> zmq.Socket:
    """The client-facing ROUTER on ``endpoint`` (a kernel's, a cluster front's): an ipc socket
    0600 in a 0700 directory, frames capped at ``abi.socket_frame_cap``."""
    if locate.is_ipc(endpoint):
        secure_ipc_dir(Path(locate.ipc_path(endpoint)))
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 2000)          # last replies (shutdown's own) still go out
    router.setsockopt(zmq.MAXMSGSIZE, abi.socket_frame_cap(max_frame))
    router.setsockopt(zmq.RCVHWM, 10_000)
    router.setsockopt(zmq.SNDHWM, 100_000)
    router.bind(endpoint)
    if locate.is_ipc(endpoint):
        os.chmod(locate.ipc_path(endpoint), 0o600)
    return router


def secure_ipc_dir(sock_path: Path) -> None:
    """The socket's directory must be enterable by its owner only (mode 0700); a shared one
    (like /tmp) is refused, never chmodded (``PermissionError``)."""
    if len(str(sock_path)) > locate.MAX_IPC_PATH:
        raise OSError(f"socket path too long for ipc ({len(str(sock_path))} > {locate.MAX_IPC_PATH}): {sock_path}")
    d = sock_path.parent
    make_private_dir(d, "the socket's directory", f"--socket ipc://{own_subdir(d) / sock_path.name}")
