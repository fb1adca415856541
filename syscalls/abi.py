"""Wire format of the syscall ABI: versioned msgpack envelopes over ZeroMQ DEALER/ROUTER.

Request  (client -> kernel, one frame):
    {"v": ABI_VERSION, "id": <int|str>, "call": <name|number>, "args": {..}, "token": <str>}
Reply    (kernel -> client, one frame each; a streamed reply is several frames with the same id):
    {"v": ABI_VERSION, "id": <same id>, "ok": true,  "result": <any>, "more": <bool>}
    {"v": ABI_VERSION, "id": <same id>, "ok": false, "error": {"errno", "code", "message"}, "more": false}
``more`` is true on every frame of a stream except the last one.

Every map in a request, the envelope and any map nested in ``args``, must have string keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from llmos.syscalls.errors import SyscallError

ABI_VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024    # default frame limit (``--max-frame``): larger requests get EMSGSIZE
SOCKET_CAP_SLACK = 1024 * 1024        # see socket_frame_cap
MAX_REQUEST_ID_LEN = 64
REQUEST_KEYS = frozenset({"v", "id", "call", "args", "token", "session"})


@dataclass(frozen=True)
class Request:
    """A decoded, well-formed request envelope (arguments not yet checked)."""
    rid: int | str
    call: str | int
    args: dict
    token: str | None
    session: str | None = None     # the client's session (heartbeats, HUP), chosen by the client


def encode_request(rid: int | str, call: str | int, args: dict, token: str | None,
                   session: str | None = None) -> bytes:
    env = {"v": ABI_VERSION, "id": rid, "call": call, "args": args, "token": token}
    if session is not None:
        env["session"] = session
    return msgpack.packb(env)


def encode_reply(rid: Any, result: Any = None, more: bool = False) -> bytes:
    return msgpack.packb({"v": ABI_VERSION, "id": rid, "ok": True, "result": result, "more": more})


def encode_error(rid: Any, err: SyscallError) -> bytes:
    return msgpack.packb({"v": ABI_VERSION, "id": rid, "ok": False, "error": err.to_wire(),
                          "more": False})


def socket_frame_cap(max_frame: int) -> int:
    """The hard cap on a frame the kernel's socket accepts (ZeroMQ MAXMSGSIZE).

    A frame over ``max_frame`` but within the cap is read and answered EMSGSIZE; one over the cap
    makes ZeroMQ drop the sender's connection unanswered. The cap bounds the memory one frame can
    take while still leaving room to answer the frames a client typically gets wrong."""
    return 2 * max_frame + SOCKET_CAP_SLACK


def _valid_rid(rid: Any) -> bool:
    if isinstance(rid, bool):
        return False
    if isinstance(rid, int):
        return 0 <= rid < 2 ** 64
    return isinstance(rid, str) and 0 < len(rid) <= MAX_REQUEST_ID_LEN


def decode_request(frame: bytes, max_frame: int | None = None) -> Request:
    """Decode one request frame; a frame over ``max_frame`` bytes is refused with EMSGSIZE.

    Raises ``SyscallError`` with ``.rid`` set when the request id could be read (the caller
    replies), or with ``.rid`` None when not even that is possible (the caller drops the
    frame and counts it).
    """
    if max_frame is not None and len(frame) > max_frame:
        raise _err(read_rid(frame), "EMSGSIZE",
                   f"request is {len(frame)} bytes; the kernel's frame limit is {max_frame}")
    try:
        # Keys are checked map by map as they are built: the cost is per map, so big arrays
        # (prompt ids) decode at C speed.
        env = msgpack.unpackb(frame, raw=False, strict_map_key=False, object_pairs_hook=_str_keyed)
    except _NonStringKey as bad:
        raise _err(read_rid(frame), "EPROTO",
                   f"map keys must be strings; found a key of type {type(bad.key).__name__}: {_short(bad.key)}")
    except Exception as exc:  # malformed msgpack of any kind
        raise _err(None, "EPROTO", f"frame is not valid msgpack ({type(exc).__name__})")
    if not isinstance(env, dict):
        raise _err(None, "EPROTO", "envelope must be a map")
    rid = env.get("id")
    if not _valid_rid(rid):
        raise _err(None, "EPROTO", "envelope has no valid request id")
    if env.get("v") != ABI_VERSION:
        raise _err(rid, "EPROTO", f"ABI version {env.get('v')!r} not supported (kernel speaks {ABI_VERSION})")
    extra = set(env) - REQUEST_KEYS
    if extra:
        raise _err(rid, "EPROTO", f"unknown envelope keys: {sorted(extra)}")
    call = env.get("call")
    if isinstance(call, bool) or not isinstance(call, (str, int)):
        raise _err(rid, "EPROTO", "envelope 'call' must be a name or a number")
    args = env.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _err(rid, "EPROTO", "envelope 'args' must be a map with string keys")
    token = env.get("token")
    if token is not None and not isinstance(token, str):
        raise _err(rid, "EPROTO", "envelope 'token' must be a string")
    session = env.get("session")
    if session is not None and not (isinstance(session, str) and 0 < len(session) <= 64):
        raise _err(rid, "EPROTO", "envelope 'session' must be a string of 1 to 64 characters")
    return Request(rid=rid, call=call, args=args, token=token, session=session)


def read_rid(frame: bytes) -> int | str | None:
    """The valid request id of a frame that is not decoded whole (too big, or a bad key), or None.

    Reads only the envelope's keys and its id; every other value is skipped, not built."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, object_pairs_hook=_no_map,
                                max_buffer_size=max(len(frame), 1))
    rid = None
    try:
        unpacker.feed(frame)
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "id":
                rid = unpacker.unpack()
            else:
                unpacker.skip()
    except Exception:   # truncated or not a map: an id read before the damage still counts
        pass
    return rid if _valid_rid(rid) else None


class _NonStringKey(Exception):
    def __init__(self, key: Any):
        self.key = key


def _str_keyed(pairs: list[tuple[Any, Any]]) -> dict:
    for key, _ in pairs:
        if type(key) is not str:
            raise _NonStringKey(key)
    return dict(pairs)


def _no_map(pairs) -> None:
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def decode_reply(frame: bytes) -> dict:
    env = msgpack.unpackb(frame, raw=False)
    if not isinstance(env, dict) or env.get("v") != ABI_VERSION or "id" not in env:
        raise SyscallError("EPROTO", "malformed reply from kernel")
    return env


def _err(rid: Any, errno: str, message: str) -> SyscallError:
    err = SyscallError(errno, message)
    err.rid = rid
    return err


# -- kernel -> service --------------------------------------------------------------------------
# A call the kernel routes to a service (one frame; the service answers with ``svc_reply``):
#     {"v": ABI_VERSION, "type": "call", "id": <int>, "call": <name>, "args": {..},
#      "caller": {"uid", "user", "caps"}}
# Everything else a service receives is an ordinary reply (to its register, heartbeat, ...).
SERVICE_CALL = "call"


def encode_service_call(kid: int, call: str, args: dict, caller: dict) -> bytes:
    return msgpack.packb({"v": ABI_VERSION, "type": SERVICE_CALL, "id": kid, "call": call, "args": args,
                          "caller": caller})


def decode_service_frame(frame: bytes) -> tuple[str, dict]:
    """What a service got from the kernel: ``("call", env)`` or ``("reply", env)``."""
    env = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    if not isinstance(env, dict) or env.get("v") != ABI_VERSION:
        raise SyscallError("EPROTO", f"frame from the kernel with ABI version {env.get('v') if isinstance(env, dict) else None!r}")
    if env.get("type") == SERVICE_CALL:
        if not (isinstance(env.get("id"), int) and isinstance(env.get("call"), str)
                and isinstance(env.get("args"), dict) and isinstance(env.get("caller"), dict)):
            raise SyscallError("EPROTO", "malformed call from the kernel")
        return SERVICE_CALL, env
    return "reply", env
