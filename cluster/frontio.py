"""The front's client sockets, read by its loop directly.

A kernel keeps ZeroMQ's client socket behind a C proxy thread so that its steps never wait on
I/O; the front has no steps, only routing, and every hop costs a thread hand-off on a small
machine. So the front's loop owns its ROUTER (the usual ipc or loopback socket, 0600 in a 0700
directory) and, with ``--listen``, the same CURVE endpoint a kernel serves (``kernel/curve.py``);
``channel`` sends each reply back the way its request came.
"""
from __future__ import annotations

import os
from pathlib import Path

import zmq

from llmos.kernel.curve import CurveEndpoint
from llmos.kernel.io import Channel, bind_router
from llmos.syscalls import locate


class FrontIO:
    def __init__(self, ctx: zmq.Context, endpoint: str, max_frame: int, listen: str | None, state: Path):
        self.endpoint = endpoint
        self.router = bind_router(ctx, endpoint, max_frame)
        self.curve = CurveEndpoint(ctx, listen, state, max_frame) if listen else None
        self.channel = Channel(self.router, self.curve)
        #: what the loop polls for requests, and the CURVE monitor it drains
        self.sockets = [self.router] + ([self.curve.router] if self.curve else [])
        self.monitors = [self.curve.monitor] if self.curve else []

    def stop(self) -> None:
        if self.curve:
            self.curve.stop()
        self.router.close(linger=1000)
        if locate.is_ipc(self.endpoint):
            try:
                os.unlink(locate.ipc_path(self.endpoint))
            except FileNotFoundError:
                pass
