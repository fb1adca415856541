"""The kernel's CURVE endpoint: the ABI over TCP to other machines, encrypted and authenticated.

ZeroMQ's CURVE (RFC 26) encrypts every frame and proves the server's identity: a client must
know the kernel's public key (``llmos kernel key``) to complete the handshake at all. The key
pair lives in ``<state>/keys/`` (``server.key`` and ``server.key_secret``, ZeroMQ certificate
files, 0600), created at first boot. pyzmq's ``ThreadAuthenticator`` answers the ZAP handshake
on the kernel's context; ``ZAP_ENFORCE_DOMAIN`` makes a missing handler fail closed.

Tokens still say who a caller is. A user may also register client public keys
(``user_key_add``); then only a connection made with one of them may speak for that user over
CURVE. So that the kernel loop knows a connection's key, it reads this socket itself (not
through the C proxy of the local socket, which drops ZeroMQ's per-message ``User-Id``; ZeroMQ's
own I/O threads still do the network work and the decryption) and hands each frame on under a
routing id that starts with a NUL byte, the key and the peer's own id. No peer can choose such
an id (ZeroMQ refuses routing ids that start with NUL, and generates 5-byte ones), so a key the
loop reads from an id is the key that connection proved.
"""
from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from llmos.syscalls import abi
from llmos.syscalls.remote import make_key_pair

PREFIX = b"\x00curve:"           # routing ids of frames that came over CURVE: PREFIX + key + peer id
KEY_LEN = 32                     # bytes of a raw public key (40 in Z85)
DOMAIN = b"llmos"
def server_keys(state: Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of this kernel, made at first call (files 0600)."""
    secret = make_key_pair(state / "keys", "server")
    public, private = zmq.auth.load_certificate(str(secret))
    return public, private


def public_key(state: Path) -> str | None:
    """The kernel's public key (Z85 text), or None before its first boot."""
    try:
        return zmq.auth.load_certificate(str(state / "keys" / "server.key"))[0].decode()
    except (OSError, ValueError):
        return None


def key_of(identity: bytes) -> str | None:
    """The Z85 client key a frame came with, or None for the local socket's."""
    if not identity.startswith(PREFIX):
        return None
    return zmq.utils.z85.encode(identity[len(PREFIX):len(PREFIX) + KEY_LEN]).decode()


class CurveEndpoint:
    """A CURVE ROUTER on ``endpoint``, read and written by the kernel loop as frames
    ``[PREFIX + key + peer id, payload]``."""

    def __init__(self, ctx: zmq.Context, endpoint: str, state: Path, max_frame: int):
        self.endpoint = endpoint
        public, secret = server_keys(state)
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.curve_server = True
        self.router.curve_publickey, self.router.curve_secretkey = public, secret
        self.router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        self.router.zap_domain = DOMAIN
        self.router.setsockopt(zmq.LINGER, 2000)
        self.router.setsockopt(zmq.MAXMSGSIZE, abi.socket_frame_cap(max_frame))
        self.router.setsockopt(zmq.RCVHWM, 10_000)
        self.router.setsockopt(zmq.SNDHWM, 100_000)
        self.router.bind(endpoint)
        self.monitor = self.router.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH, addr=f"inproc://llmos-curve-mon-{id(self)}")

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        """The next frame, its routing id naming the key it came with (raises ``zmq.Again``)."""
        while True:
            frames = self.router.recv_multipart(flags, copy=False)
            key = frames[-1].get("User-Id")            # the Z85 key ZAP saw (CURVE proved it)
            raw = zmq.utils.z85.decode(key.encode()) if key else b""
            if len(raw) == KEY_LEN:
                return [PREFIX + raw + frames[0].bytes, *(f.bytes for f in frames[1:])]

    def send_multipart(self, frames) -> None:
        self.router.send_multipart([frames[0][len(PREFIX) + KEY_LEN:], *frames[1:]])

    def stop(self) -> None:
        self.router.disable_monitor()
        for s in (self.monitor, self.router):
            s.close(0)
        self.auth.stop()
