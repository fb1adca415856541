"""Bad input always gets a clear error, never silence: non-string map keys, oversized frames,
shared directories for the socket or the state."""
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from llmos import SyscallError
from llmos.kernel.security import make_private_dir
from llmos.syscalls import abi

SMALL_FRAME = 4096          # --max-frame for the size tests: frames stay small
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


@pytest.fixture
def shared_dir():
    """A directory shared like /tmp: mode 1777."""
    d = Path(tempfile.mkdtemp(prefix="llmos-shared-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def boot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmos.kernel", "--model", "none", "--no-services", *args],
                          capture_output=True, text=True, timeout=120)


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


# -- frame sizes --------------------------------------------------------------------------------
def test_nop_tells_the_kernels_frame_limit(start_kernel):
    k = start_kernel("--max-frame", str(SMALL_FRAME))
    with k.client() as c:
        assert c.nop()["max_frame"] == SMALL_FRAME


def test_a_too_large_client_call_fails_fast_with_emsgsize_and_is_not_sent(start_kernel):
    k = start_kernel("--max-frame", str(SMALL_FRAME))
    pad = "y" * 100_000                                     # above the size that makes a client ask
    with k.client(timeout=30) as c:
        before = c.stat()["requests"]
        t0 = time.monotonic()
        with pytest.raises(SyscallError) as e:
            c.call("nop", pad=pad)
        assert time.monotonic() - t0 < 10
        size = len(abi.encode_request(1, "nop", {"pad": pad}, c.token, c.session))
        assert e.value.errno == "EMSGSIZE"
        assert f"{size} bytes" in e.value.message and str(SMALL_FRAME) in e.value.message
        with pytest.raises(SyscallError) as e:               # the limit is known now: small frames too
            c.call("nop", pad="y" * 10_000)
        assert e.value.errno == "EMSGSIZE"
        assert c.nop()["boot_id"]
        s = c.stat()
    assert s["requests"] == before + 3             # the nop that learnt the limit, nop, stat: nothing big
    assert "EMSGSIZE" not in s["rejects"]


def test_a_frame_between_max_frame_and_the_hard_cap_gets_emsgsize(start_kernel):
    k = start_kernel("--max-frame", str(SMALL_FRAME))
    frame = abi.encode_request(44, "nop", {"pad": "y" * 10_000}, k.token)
    assert SMALL_FRAME < len(frame) < abi.socket_frame_cap(SMALL_FRAME)
    s = raw_socket(k)
    reply = ask(s, frame)
    assert reply["id"] == 44 and reply["error"]["errno"] == "EMSGSIZE"
    assert str(len(frame)) in reply["error"]["message"] and str(SMALL_FRAME) in reply["error"]["message"]
    assert ask(s, abi.encode_request(45, "nop", {}, k.token))["ok"]    # the connection was kept
    s.close()


# -- shared directories -------------------------------------------------------------------------
def test_a_shared_state_dir_is_refused_and_its_mode_unchanged(shared_dir):
    r = boot("--state-dir", str(shared_dir))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "shared directory" in r.stderr and "of your own" in r.stderr
    assert stat.S_IMODE(shared_dir.stat().st_mode) == 0o1777
    assert list(shared_dir.iterdir()) == []


def test_a_shared_socket_directory_is_refused_and_its_mode_unchanged(shared_dir, tmp_path):
    r = boot("--state-dir", str(tmp_path / "state"), "--socket", f"ipc://{shared_dir}/k.sock")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "shared directory" in r.stderr and "--socket ipc://" in r.stderr
    assert stat.S_IMODE(shared_dir.stat().st_mode) == 0o1777
    assert list(shared_dir.iterdir()) == []


def test_a_directory_of_our_own_is_still_made_private(tmp_path):
    d = tmp_path / "mine"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    make_private_dir(d, "a test directory", "-")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
