"""A cluster kernel's way to the services it does not run: the head kernel's.

In a cluster (``llmos.cluster``) only the head kernel runs the services (file store, graph,
tuner). Every other kernel is told by the front (``users_sync(upstream=…)``) where the head is
and root's token; then a call the kernel itself makes to a service (``ServiceManager.ask``: a
feedback record, facts for a spawn, a checkpoint image in the file store) goes to the head as
``svc_call`` on the user's behalf, checked there against that user's capabilities, and the
answer comes back to the same ``on_reply``. Over the head's ipc socket on the same node, else
over CURVE with a client key of this kernel's own.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import msgpack
import zmq
import zmq.auth

from llmos.syscalls import abi, locate
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.remote import make_key_pair


class Upstream:
    def __init__(self, ctx: zmq.Context, where: dict, keys: Path):
        endpoint, token = where.get("endpoint"), where.get("token")
        if not (isinstance(endpoint, str) and isinstance(token, str)):
            raise SyscallError("EINVAL", "upstream wants {endpoint, token[, server_key]}")
        self.token = token
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if endpoint.startswith("tcp://"):
            key = where.get("server_key")
            if not isinstance(key, str):
                raise SyscallError("EINVAL", "an upstream over TCP needs the head's server_key")
            public, secret = zmq.auth.load_certificate(str(make_key_pair(keys, "upstream")))
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = key.encode(), public, secret
        elif not locate.is_ipc(endpoint):
            raise SyscallError("EINVAL", f"upstream endpoint {endpoint!r} is neither tcp:// nor ipc://")
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)
        self.pending: dict[int, object] = {}

    def ask(self, name: str, args: dict, user, on_reply) -> None:
        rid = next(self.ids)
        self.pending[rid] = on_reply
        self.sock.send(abi.encode_request(rid, "svc_call", {"call": name, "args": args, "uid": user.uid}, self.token))

    def drain(self) -> None:
        """Deliver the answers that have come (on the loop)."""
        while True:
            try:
                env = msgpack.unpackb(self.sock.recv(zmq.NOBLOCK), raw=False, strict_map_key=False)
            except zmq.Again:
                return
            except Exception:
                continue
            on_reply = self.pending.pop(env.get("id"), None) if not env.get("more") else None
            if on_reply is not None:
                on_reply(True, env.get("result")) if env.get("ok") else on_reply(
                    False, SyscallError.from_wire(env.get("error")))

    def close(self) -> None:
        for on_reply in self.pending.values():
            on_reply(False, SyscallError("EAGAIN", "the head's services moved; try again"))
        self.pending.clear()
        self.sock.close(0)
