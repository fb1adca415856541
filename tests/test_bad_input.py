"""Bad input always gets a clear error, never silence: non-string map keys."""

import msgpack
import pytest
import zmq

from llmos.syscalls import abi

REPLY_WITHIN_MS = 10_000    # "quickly": a client's default timeout is 30 s


def raw_socket(kernel):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(kernel.socket)
    return s


def ask(sock, frame: bytes) -> dict:
    sock.send(frame)
    assert sock.poll(REPLY_WITHIN_MS), "no reply"
    return msgpack.unpackb(sock.recv())


def envelope(rid, token: str, args: bytes = b"\x80") -> bytes:
    """A request frame whose ``args`` are given as msgpack bytes (to build keys Python can't)."""
    pairs = [("v", abi.ABI_VERSION), ("id", rid), ("call", "nop"), ("token", token)]
    return (bytes([0x80 | (len(pairs) + 1)])             # a fixmap header
            + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs) + msgpack.packb("args") + args)


# -- map keys -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rid", [41, "req-41"])
def test_an_int_key_in_the_envelope_gets_eproto_with_the_request_id(kernel, rid):
    frame = msgpack.packb({"v": abi.ABI_VERSION, "id": rid, "call": "nop", "args": {},
                           "token": kernel.token, 7: "x"})
    s = raw_socket(kernel)
    reply = ask(s, frame)
    assert reply["id"] == rid and reply["error"]["errno"] == "EPROTO"
    assert "string" in reply["error"]["message"]
    s.close()


@pytest.mark.parametrize("args", [
    msgpack.packb({"x": {"y": [1, 2, {3: "z"}]}}),           # an int key deep inside
    msgpack.packb({"x": {b"raw": 1}}),                       # a bytes key
    b"\x81" + b"\x81" + msgpack.packb("k") + msgpack.packb(1) + msgpack.packb(2),   # a map as a key
], ids=["int", "bytes", "map"])
def test_a_non_string_key_nested_in_args_gets_eproto_with_the_request_id(kernel, root, args):
    s = raw_socket(kernel)
    reply = ask(s, envelope(42, kernel.token, args))
    assert reply["id"] == 42 and reply["error"]["errno"] == "EPROTO"
    assert root.stat()["frames_dropped"] == 0
    s.close()


def test_a_non_string_key_with_no_readable_id_is_dropped_and_counted(kernel, root):
    s = raw_socket(kernel)
    s.send(msgpack.packb({"v": abi.ABI_VERSION, "call": "nop", "args": {1: 2}}))
    reply = ask(s, envelope(43, kernel.token))               # the next request is still answered
    assert reply["id"] == 43 and reply["ok"]
    assert root.stat()["frames_dropped"] == 1
    s.close()


def test_big_int_lists_decode_and_only_maps_have_their_keys_checked():
    ids = list(range(100_000))
    req = abi.decode_request(abi.encode_request(1, "spawn", {"prompt_ids": ids, "m": {"k": [{"a": 1}]}}, None))
    assert req.args["prompt_ids"] == ids and req.args["m"] == {"k": [{"a": 1}]}
