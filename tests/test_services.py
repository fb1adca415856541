"""The service framework, with a third-party plug-in (tests/plugins/echo, installed by the Makefile)."""
import time

import pytest

from conftest import errno_of, wait_for
from llmos import connect


def echo_state(c) -> dict:
    return next((s for s in c.svc_list() if s["name"] == "echo"), {})


@pytest.fixture
def svc_kernel(start_kernel):
    k = start_kernel("--service", "echo")
    with k.client() as c:
        wait_for(lambda: echo_state(c).get("state") == "up")
    return k


def test_a_plugin_service_serves_its_calls_with_the_callers_verified_identity(svc_kernel):
    with svc_kernel.client() as root:
        alice = svc_kernel.client(root.user_add("alice")["token"])
        row = echo_state(root)
        assert row["state"] == "up" and row["pid"] and set(row["calls"]) >= {"echo", "echo_count"}
        assert row["schemas"]["echo"]["args"] == ["text"]
    r = alice.call("echo", text="hello")
    assert r["text"] == "hello" and r["caller"]["user"] == "alice" and r["caller"]["uid"] == 1000
    assert list(alice.stream("echo_count", n=3)) == [0, 1, 2, None]
    with svc_kernel.client() as root:
        assert echo_state(root)["calls_served"] == 2


def test_service_calls_are_checked_by_the_kernel_from_the_services_schema(svc_kernel):
    with svc_kernel.client() as root:
        nofs = svc_kernel.client(root.user_add("bob", caps=["proc"])["token"])
        assert errno_of(root.call, "echo") == "EINVAL"                     # text is required
        assert errno_of(root.call, "echo", text="x" * 1001) == "E2BIG"
        assert errno_of(root.call, "echo", text="hi", extra=1) == "EINVAL"
        assert errno_of(nofs.call, "echo", text="hi") == "EPERM"          # echo needs the fs capability
        assert echo_state(root)["calls_served"] == 0                       # none of them reached it


def test_only_a_running_service_can_speak_for_it(svc_kernel):
    with svc_kernel.client() as root:
        assert errno_of(root.call, "svc_reply", id=1, ok=True) == "EPERM"
        assert errno_of(root.call, "svc_register", name="echo", calls=[]) == "EPERM"
    forged = connect(svc_kernel.socket, "svc_not-a-real-token", timeout=5)
    assert errno_of(forged.call, "svc_heartbeat", name="echo") == "EACCES"


def test_a_crashed_service_is_restarted_and_answers_eagain_meanwhile(svc_kernel):
    with svc_kernel.client() as c:
        first_pid = echo_state(c)["pid"]
        assert errno_of(c.call, "echo_crash") == "EAGAIN"                # its pending call fails cleanly
        assert errno_of(c.call, "echo", text="hi") == "EAGAIN"           # down: try again
        wait_for(lambda: echo_state(c).get("state") == "up")
        row = echo_state(c)
        assert row["restarts"] == 1 and row["pid"] != first_pid
        assert c.call("echo", text="back")["text"] == "back"


def test_a_hung_service_is_noticed_by_missed_heartbeats_and_restarted(svc_kernel):
    with svc_kernel.client() as c:
        assert errno_of(c.call, "echo_hang", _timeout=30) == "EAGAIN"   # failed when it was declared dead
        wait_for(lambda: echo_state(c).get("state") == "up" and echo_state(c)["restarts"] == 1, timeout=30)
        assert c.call("echo", text="ok")["text"] == "ok"


def test_admins_start_and_stop_services(start_kernel):
    k = start_kernel()
    with k.client() as root:
        assert root.svc_list() == []
        assert errno_of(root.call, "echo", text="hi") == "ENOSYS"        # not running, never registered
        assert errno_of(root.svc_start, "no-such-service") == "ENOENT"
        assert root.svc_start("echo")["state"] == "starting"
        wait_for(lambda: echo_state(root).get("state") == "up")
        assert root.call("echo", text="hi")["text"] == "hi"
        user = k.client(root.user_add("carol")["token"])
        assert errno_of(user.svc_stop, "echo") == "EPERM"
        assert root.svc_stop("echo") is True
        assert echo_state(root)["state"] == "stopped"
        assert errno_of(root.call, "echo", text="hi") == "ENOSYS"


def test_a_call_the_service_never_answers_times_out_in_the_kernel(start_kernel):
    k = start_kernel("--service", "echo", "--service-call-timeout", "1")
    with k.client() as c:
        wait_for(lambda: echo_state(c).get("state") == "up")
        t0 = time.monotonic()
        assert errno_of(c.call, "echo_hang") == "ETIMEDOUT"
        assert time.monotonic() - t0 < 4                  # the kernel's deadline, before any heartbeat loss


@pytest.mark.parametrize("delegate", [False, True])
def test_a_plugin_acts_for_users_only_when_delegated(start_kernel, delegate):
    k = start_kernel("--service", "echo", "--service", "fs", *(("--delegate", "echo") if delegate else ()))
    with k.client() as root:
        wait_for(lambda: {s["name"]: s["state"] for s in root.svc_list()} == {"echo": "up", "fs": "up"})
        alice = root.user_add("alice")
        with k.client(alice["token"]) as a:
            a.call("fs_put", path="mine.txt", data=b"x")
        if delegate:
            assert [f["path"] for f in root.call("echo_ls_as", uid=alice["uid"])] == ["mine.txt"]
        else:
            assert errno_of(root.call, "echo_ls_as", uid=alice["uid"]) == "EPERM"


def test_a_threaded_call_may_block_while_the_service_serves_and_heartbeats(svc_kernel):
    import threading
    with svc_kernel.client() as root:
        pid = echo_state(root)["pid"]
        got = {}
        slow = threading.Thread(target=lambda: got.setdefault("r", svc_kernel.client().call("echo_slow", seconds=6.5)))
        slow.start()
        time.sleep(0.5)
        assert root.call("echo", text="meanwhile")["text"] == "meanwhile"    # not stuck behind it
        slow.join(30)
        assert got["r"] == {"slept": 6.5, "caller": "root"}
        row = echo_state(root)
        assert row["state"] == "up" and row["pid"] == pid and row["restarts"] == 0   # past 5 s of heartbeats


def test_a_service_that_starts_slowly_is_waited_for_not_restarted(start_kernel, monkeypatch):
    monkeypatch.setenv("LLMOS_ECHO_SETUP_S", "6.5")        # past the 5 s heartbeat limit of a running one
    k = start_kernel("--service", "echo")
    with k.client() as root:
        assert echo_state(root)["state"] == "starting"
        wait_for(lambda: echo_state(root).get("state") == "up", timeout=60)
        assert echo_state(root)["restarts"] == 0
