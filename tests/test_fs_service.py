"""The file store as a service: namespaces, sharing, chunked transfers, restarts."""
import os
import signal

import pytest

from llmos import SyscallError
from conftest import errno_of, wait_for


def fs_up(c) -> bool:
    return any(s["name"] == "fs" and s["state"] == "up" for s in c.svc_list())


@pytest.fixture
def fs_kernel(start_kernel, monkeypatch):
    monkeypatch.setenv("LLMOS_FS_QUOTA", str(40 << 20))
    k = start_kernel("--service", "fs")
    with k.client() as root:
        wait_for(lambda: fs_up(root))
        k.alice = k.client(root.user_add("alice")["token"])
        k.bob = k.client(root.user_add("bob")["token"])
    return k


def test_builtin_service_names_agree_between_kernel_and_runner():
    from llmos.kernel.syssvc import BUILTIN_SERVICES
    from llmos.services.run import BUILTIN
    assert set(BUILTIN_SERVICES) == set(BUILTIN)


def test_files_live_in_per_user_namespaces_and_are_shared_read_only(fs_kernel):
    alice, bob = fs_kernel.alice, fs_kernel.bob
    st = alice.call("fs_put", path="notes/a.txt", data=b"hello")
    assert st["size"] == 5 and alice.call("fs_get", path="notes/a.txt") == b"hello"
    assert [f["path"] for f in alice.call("fs_list")] == ["notes/a.txt"]
    assert bob.call("fs_list") == []
    alice_uid = alice.whoami()["uid"]
    assert errno_of(bob.call, "fs_get", path="notes/a.txt", owner=alice_uid) == "EACCES"
    alice.call("fs_share", prefix="notes", reader=bob.whoami()["uid"])
    assert bob.call("fs_get", path="notes/a.txt", owner=alice_uid) == b"hello"
    assert errno_of(bob.call, "fs_rm", path="notes/a.txt") == "ENOENT"     # bob's own namespace has no such file
    alice.call("fs_mv", src="notes/a.txt", dst="notes/b.txt")
    assert errno_of(alice.call, "fs_stat", path="notes/a.txt") == "ENOENT"
    assert alice.call("fs_rm", path="notes/b.txt") is True
    assert errno_of(alice.call, "fs_put", path="../escape", data=b"x") == "EINVAL"


def test_large_files_move_in_chunks_both_ways(fs_kernel):
    alice = fs_kernel.alice
    chunk = os.urandom(1 << 20)
    h = alice.call("fs_write_open", path="big.bin")["handle"]
    for i in range(24):
        alice.call("fs_write", handle=h, data=chunk[i:] + chunk[:i])
    st = alice.call("fs_write_commit", handle=h)
    assert st["size"] == 24 << 20
    got = list(alice.stream("fs_read", path="big.bin"))
    assert got[-1] is None and sum(len(b) for b in got[:-1]) == 24 << 20
    assert b"".join(got[:-1])[:5 << 20] == b"".join(chunk[i:] + chunk[:i] for i in range(5))
    assert errno_of(alice.call, "fs_get", path="big.bin") == "E2BIG"      # whole: too big for one frame
    assert alice.call("fs_get", path="big.bin", offset=1 << 20, length=10) == chunk[1:11]
    h = alice.call("fs_write_open", path="huge.bin")["handle"]
    with pytest.raises(SyscallError) as e:
        for _ in range(20):
            alice.call("fs_write", handle=h, data=chunk)                  # 24 + 20 MiB > 40 MiB quota
    assert e.value.errno == "EDQUOT"
    assert errno_of(alice.call, "fs_stat", path="huge.bin") == "ENOENT"   # nothing half-written
    assert alice.call("fs_usage")["bytes"] == 24 << 20


def test_files_survive_the_service_being_killed(fs_kernel):
    alice = fs_kernel.alice
    alice.call("fs_put", path="keep.txt", data=b"durable")
    with fs_kernel.client() as root:
        pid = next(s["pid"] for s in root.svc_list() if s["name"] == "fs")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: any(s["name"] == "fs" and s["state"] == "up" and s["restarts"] == 1
                             for s in root.svc_list()))
    assert alice.call("fs_get", path="keep.txt") == b"durable"
