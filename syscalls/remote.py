"""The client's side of CURVE: key files, named remotes, and a DEALER that proves its handshake.

A kernel on another machine serves the ABI over CURVE-encrypted TCP (``kernel/curve.py``). To
reach it a client needs the kernel's public key (``llmos kernel key`` prints it) and a key pair
of its own: ``$LLMOS_CLIENT_KEY`` (a ZeroMQ secret-key certificate file), else
``<config>/client.key_secret``, made at first use (0600). ``<config>`` is ``$LLMOS_CONFIG_DIR``,
else ``~/.config/llmos``. Named remotes (``llmos remote add``) live in ``<config>/remotes.json``
(0600): an endpoint, the server's key and a token for each.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from llmos.syscalls.errors import SyscallError

HANDSHAKE_TIMEOUT = 2.0      # seconds: a wrong key or no kernel is reported this fast
_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def config_dir() -> Path:
    return Path(os.environ.get("LLMOS_CONFIG_DIR") or Path.home() / ".config" / "llmos").expanduser()


def client_keys(path: str | None = None) -> tuple[bytes, bytes]:
    """(public, secret) of this client: ``path`` (a secret-key certificate), ``$LLMOS_CLIENT_KEY``,
    or the default pair, made now if there is none."""
    given = path or os.environ.get("LLMOS_CLIENT_KEY")
    secret = Path(given).expanduser() if given else config_dir() / "client.key_secret"
    if not given:
        make_key_pair(secret.parent, "client")
    try:
        public, private = zmq.auth.load_certificate(str(secret))
    except (OSError, ValueError) as exc:
        raise SyscallError("EINVAL", f"cannot read the client key {secret}: {exc}")
    if private is None:
        raise SyscallError("EINVAL", f"{secret} holds no secret key (give the .key_secret file)")
    return public, private


def make_key_pair(directory: Path, name: str) -> Path:
    """``directory/name.key`` and ``name.key_secret`` (ZeroMQ certificate files, 0600 in a 0700
    directory), made unless they exist; returns the secret one. The kernel's and clients' alike."""
    secret = directory / f"{name}.key_secret"
    if not secret.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        old = os.umask(0o077)
        try:
            zmq.auth.create_certificates(str(directory), name)
        finally:
            os.umask(old)
    return secret


def public_key_text(text_or_file: str) -> str:
    """A Z85 public key given as itself or as a certificate file (``server.key``, ``client.key``)."""
    text = text_or_file.strip()
    if len(text) == 40 and not os.path.exists(text):
        return text
    try:
        return zmq.auth.load_certificate(os.path.expanduser(text))[0].decode()
    except (OSError, ValueError) as exc:
        raise SyscallError("EINVAL", f"not a CURVE public key (40 Z85 characters) nor a key file: {text[:80]!r} "
                                     f"({exc})")


# -- named remotes ---------------------------------------------------------------------------
def _remotes_file() -> Path:
    return config_dir() / "remotes.json"


def remotes() -> dict[str, dict]:
    try:
        return json.loads(_remotes_file().read_text())
    except (OSError, ValueError):
        return {}


def add_remote(name: str, endpoint: str, server_key: str, token: str) -> dict:
    if not endpoint.startswith("tcp://"):
        raise SyscallError("EINVAL", f"a remote is a tcp://HOST:PORT address, not {endpoint!r}")
    entry = {"endpoint": endpoint, "server_key": public_key_text(server_key), "token": token.strip()}
    _save({**remotes(), name: entry})
    return entry


def remove_remote(name: str) -> None:
    table = remotes()
    if table.pop(name, None) is None:
        raise SyscallError("ENOENT", f"no remote named {name!r}")
    _save(table)


def _save(table: dict) -> None:
    """Atomically, mode 0600 (it holds tokens)."""
    f = _remotes_file()
    f.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        json.dump(table, out, indent=1)
    os.replace(tmp, f)


def remote(name: str) -> dict:
    entry = remotes().get(name)
    if entry is None:
        raise SyscallError("ENOENT", f"no remote named {name!r} (llmos remote add {name} tcp://HOST:PORT "
                                     f"--server-key KEY --token-file F)")
    return entry


# -- sockets ---------------------------------------------------------------------------------
class Curve:
    """What a CURVE DEALER needs: the server's public key and this client's pair."""

    def __init__(self, server_key: str, client_key: str | None = None):
        self.server_key = public_key_text(server_key).encode()
        self.public, self.secret = client_keys(client_key)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_key
        sock.curve_publickey, sock.curve_secretkey = self.public, self.secret


def check_handshake(sock: zmq.Socket, endpoint: str, connect) -> None:
    """``connect()`` ``sock`` while watching its monitor: return once the CURVE handshake
    succeeds, or raise ``ECONNREFUSED`` saying why within ``HANDSHAKE_TIMEOUT``."""
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | sum(_FAILED),
                                  addr=f"inproc://llmos-handshake-{secrets.token_hex(8)}")
    try:
        connect()
        end = time.monotonic() + HANDSHAKE_TIMEOUT
        while time.monotonic() < end:
            if not mon.poll(max(1, int((end - time.monotonic()) * 1000))):
                break
            event = recv_monitor_message(mon)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
            if event in _FAILED:
                raise SyscallError("ECONNREFUSED", f"the CURVE handshake with {endpoint} failed: the server "
                                                   f"key is not that kernel's (llmos kernel key prints it), or "
                                                   f"it refused this client")
        raise SyscallError("ECONNREFUSED", f"no CURVE handshake with {endpoint} within {HANDSHAKE_TIMEOUT:g}s: "
                                           f"is a kernel listening there (llmos kernel start --listen)?")
    finally:
        sock.disable_monitor()
        mon.close(0)
