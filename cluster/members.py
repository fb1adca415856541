"""The kernels of a cluster as the front sees them: one ``Member`` record per kernel.

A member is JOINING until its actor has booted and the front has given it the cluster's users,
UP while it takes calls, DOWN from its death (Ray's ``watch`` call failed or returned) until Ray
has restarted it, DRAINING while its processes move away, and GONE for good. The front speaks
to it over CURVE TCP with the front's client key (which the kernel trusts to check users' keys).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import zmq

from llmos.syscalls import abi


class MemberState(enum.Enum):
    JOINING = "joining"
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"
    GONE = "gone"


@dataclass
class Member:
    kernel: int
    actor: object
    state: MemberState = MemberState.JOINING
    info: dict = field(default_factory=dict)
    sock: zmq.Socket | None = None
    watch_ref: object = None               # Ray: answers when the kernel exits or the actor dies
    info_ref: object = None                # Ray: answers once the actor (re)booted
    boot_id: str | None = None
    restarts: int = 0
    load: int = 0                          # live processes at the last poll, plus spawns placed and less waits answered since
    models: dict = field(default_factory=dict)    # model name -> where (device | host | disk)
    stats: dict = field(default_factory=dict)     # the last stat reply
    polling: bool = False
    parked: list = field(default_factory=list)    # calls for its processes, waiting for its restart
    slot: tuple | None = None              # (placement group, bundle index) it runs in
    num_polls: int = 0
    polled_at: float = 0.0                 # when its last load poll was sent

    @property
    def node(self) -> str:
        return self.info.get("host", "")

    @property
    def takes_spawns(self) -> bool:
        return self.state is MemberState.UP

    def connect(self, ctx: zmq.Context, front_public: bytes, front_secret: bytes) -> None:
        """A fresh DEALER to the kernel (replies to an older one are never confused with it)."""
        self.close()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.setsockopt(zmq.MAXMSGSIZE, -1)
        # CURVE even on the same node: the kernel's loop reads that socket itself, while its local
        # one sits behind a proxy thread, one hand-off more per call (bench/cluster.py, (b)).
        s.curve_serverkey = self.info["server_key"].encode()
        s.curve_publickey, s.curve_secretkey = front_public, front_secret
        s.connect(self.info["listen"])
        self.sock = s

    def send(self, fid: int, call: str, args: dict, token: str | None, session: str | None = None) -> None:
        self.sock.send(abi.encode_request(fid, call, args, token, session), zmq.NOBLOCK)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def row(self) -> dict:
        """What ``cluster`` shows of it."""
        return {"kernel": self.kernel, "node": self.info.get("node", ""), "host": self.node,
                "state": self.state.value, "boot_id": self.boot_id, "restarts": self.restarts,
                "procs": self.stats.get("procs", 0), "load": self.load, "models": dict(self.models),
                "tokens_generated": self.stats.get("tokens_generated", 0),
                "prefix_hit_tokens": self.stats.get("prefix_hit_tokens", 0),
                "listen": self.info.get("listen"), "pid": self.info.get("pid")}
