"""A real kernel process: calls, authentication, capabilities, bad input, floods."""
import os
import stat
import time

import msgpack
import pytest
import zmq

from llmos import SyscallError, connect
from llmos.syscalls import abi


def raw_socket(kernel, routing_id: bytes | None = None):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if routing_id:
        s.setsockopt(zmq.ROUTING_ID, routing_id)
    s.connect(kernel.socket)
    return s


def ask(sock, frame: bytes, timeout_ms: int = 5000):
    sock.send(frame)
    assert sock.poll(timeout_ms), "no reply"
    return msgpack.unpackb(sock.recv())


def test_first_calls_answer(root):
    u = root.uname()
    assert u["sysname"] == "llmos" and u["abi"] == abi.ABI_VERSION and u["boot_id"]
    assert root.whoami() == {"user": "root", "uid": 0, "caps": sorted(["proc", "mm", "fs", "kg", "tune", "prio", "host", "admin", "metrics"])}
    assert root.ps() == []
    s = root.stat()
    assert s["requests"] >= 3 and s["uptime_s"] >= 0


def test_missing_and_bad_tokens_are_refused(kernel):
    for token in (None, "llmos_not-a-real-token"):
        c = connect(kernel.socket, token, timeout=5)
        c.token = token
        with pytest.raises(SyscallError) as e:
            c.uname()
        assert e.value.errno == "EACCES"


def test_forged_routing_id_grants_nothing(kernel, root):
    alice_token = root.user_add("alice")["token"]
    with kernel.client(alice_token) as alice:
        assert alice.whoami()["user"] == "alice"
    # An attacker picks a routing id (even one a root client used) and sends no or a user token.
    forged = raw_socket(kernel, routing_id=b"root")
    reply = ask(forged, abi.encode_request(1, "shutdown", {}, None))
    assert reply["ok"] is False and reply["error"]["errno"] == "EACCES"
    reply = ask(forged, abi.encode_request(2, "shutdown", {}, alice_token))
    assert reply["error"]["errno"] == "EPERM"
    reply = ask(forged, abi.encode_request(3, "whoami", {}, alice_token))
    assert reply["result"]["user"] == "alice"
    forged.close()
    assert root.nop()["boot_id"]           # the kernel is still up


def test_capabilities_are_enforced_per_class(kernel, root):
    tok = root.user_add("bob", caps=["proc"])["token"]
    with kernel.client(tok) as bob:
        assert bob.ps() == []
        for call in ("meminfo", "user_list", "shutdown"):
            with pytest.raises(SyscallError) as e:
                bob.call(call)
            assert e.value.errno == "EPERM", call


def test_user_tokens_are_new_and_all_valid(kernel, root):
    first = root.user_add("carol")["token"]
    second = root.user_token("carol")["token"]
    assert first != second
    for t in (first, second):
        with kernel.client(t) as c:
            assert c.whoami()["user"] == "carol"
    with pytest.raises(SyscallError) as e:
        root.user_add("carol")
    assert e.value.errno == "EEXIST"
    listed = {u["user"]: u for u in root.user_list()}
    assert listed["carol"]["num_tokens"] == 2 and "token_hashes" not in listed["carol"]


def test_state_files_are_private(kernel):
    for name in ("users.json", "token"):
        assert stat.S_IMODE(os.stat(kernel.state / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(kernel.state / "run").st_mode) == 0o700
    assert kernel.token not in (kernel.state / "users.json").read_text()


@pytest.mark.parametrize("call,args,errno", [
    ("no_such_call", {}, "ENOSYS"),
    (999, {}, "ENOSYS"),
    ("nice", {}, "EINVAL"),
    ("nice", {"pid": "x", "value": 1}, "EINVAL"),
    ("nice", {"pid": 1, "value": 99}, "EINVAL"),
    ("uname", {"surprise": 1}, "EINVAL"),
    ("kill", {"pid": 12345}, "ESRCH"),
])
def test_bad_calls_get_clear_errors_and_the_kernel_keeps_serving(root, call, args, errno):
    with pytest.raises(SyscallError) as e:
        root.call(call, **args)
    assert e.value.errno == errno and e.value.message
    assert root.nop()


def test_undecodable_frames_are_dropped_and_counted(kernel, root):
    s = raw_socket(kernel)
    for frame in (b"\xc1\xc1", msgpack.packb([1, 2, 3]), msgpack.packb({"v": 1, "call": "nop"})):
        s.send(frame)
    s.send_multipart([b"two", b"frames"])
    reply = ask(s, msgpack.packb({"v": 7, "id": 9, "call": "nop"}))
    assert reply["id"] == 9 and reply["error"]["errno"] == "EPROTO"
    assert root.stat()["frames_dropped"] == 4
    s.close()


def test_a_frame_over_the_hard_cap_is_dropped_by_the_socket(start_kernel):
    k = start_kernel("--max-frame", "4096")
    s = raw_socket(k)
    s.send(abi.encode_request(1, "nop", {"x": "y" * (abi.socket_frame_cap(4096) + 1)}, k.token))
    assert not s.poll(1000)
    with k.client() as c:
        assert c.nop()
        deadline = time.monotonic() + 5
        while c.stat()["disconnects"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.stat()["disconnects"] >= 1
        assert c.stat()["rejects"].get("EMSGSIZE", 0) == 0       # it never reached the kernel loop


def test_a_flooding_client_gets_eagain_while_others_are_served(start_kernel):
    k = start_kernel("--rate-limit", "500")
    with k.client() as root:
        flood_token = root.user_add("flood")["token"]
        calm_token = root.user_add("calm")["token"]
    flood = raw_socket(k)
    n = 3000
    for i in range(n):
        flood.send(abi.encode_request(i, "nop", {}, flood_token))
    with k.client(calm_token, timeout=5) as calm:
        t0 = time.monotonic()
        assert calm.whoami()["user"] == "calm"
        assert time.monotonic() - t0 < 2.0
    replies = []
    while len(replies) < n and flood.poll(5000):
        replies.append(msgpack.unpackb(flood.recv()))
    assert len(replies) == n                          # every request got an answer
    refused = [r for r in replies if not r["ok"]]
    assert refused and all(r["error"]["errno"] == "EAGAIN" for r in refused)
    assert any(r["ok"] for r in replies)
    flood.close()


def test_no_kernel_is_a_clear_error_not_a_hang(tmp_path):
    c = connect(f"ipc://{tmp_path}/nothing.sock", "tok", timeout=1)
    with pytest.raises(SyscallError) as e:
        c.uname()
    assert e.value.errno == "ECONNREFUSED"


def test_a_kernel_that_stops_answering_times_out(kernel):
    c = kernel.client(timeout=1.0)
    assert c.nop()
    kernel.proc.send_signal(19)      # SIGSTOP: the socket stays, nobody answers
    try:
        t0 = time.monotonic()
        with pytest.raises(SyscallError) as e:
            c.uname()
        assert e.value.errno == "ETIMEDOUT" and time.monotonic() - t0 < 5
    finally:
        kernel.proc.send_signal(18)  # SIGCONT
    assert c.uname()                 # and works again afterwards


def test_pipelined_calls_answer_in_order_and_the_first_error_raises(root):
    users = list(root.pipeline("user_add", ({"name": f"p{i}"} for i in range(20)), window=5))
    assert [u["user"] for u in users] == [f"p{i}" for i in range(20)]
    seq = [{"name": "q0"}, {"name": "p3"}, {"name": "q1"}]          # p3 exists: EEXIST
    got = []
    with pytest.raises(SyscallError) as e:
        for u in root.pipeline("user_add", seq, window=3):
            got.append(u["user"])
    assert e.value.errno == "EEXIST" and got == ["q0"]
    assert root.whoami()["user"] == "root"            # the late reply of q1 was dropped, not mistaken
    assert "q1" in {u["user"] for u in root.user_list()}
