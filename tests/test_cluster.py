"""A real cluster: three kernels as Ray actors on a local Ray cluster, behind one front.

Through the front, clients cannot tell it from one kernel: greedy output equals transformers'
``generate`` on every kernel; ``ps``, ``kill``, ``wait``, ``fork``, ``read`` work across kernels
with global pids; users added at the front work everywhere; the example programs and the gateway
run unchanged. A drain moves 20 live processes with identical output, a killed kernel actor is
restarted by Ray with its processes continuing exactly, and one lost for good fails only its
own processes, cleanly (EHOSTDOWN).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import httpx
import msgpack
import openai
import pytest
import zmq
from cluster_proc import ClusterProc
from conftest import errno_of, wait_for
from fixtures_models import hf_greedy, prompt_of
from llmos.syscalls import abi

ARGS = ("--device", "cpu", "--dtype", "float32", "--max-num-seqs", "32", "--journal-interval", "0")
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    c = ClusterProc(*ARGS, kernels=3).start()
    yield c
    c.cleanup()


@pytest.fixture(scope="module")
def root(cluster):
    with cluster.client() as c:
        yield c


def up_kernels(root) -> list[int]:
    return [k["kernel"] for k in root.cluster()["kernels"] if k["state"] == "up"]


def row_of(root, kernel: int) -> dict:
    return next(k for k in root.cluster()["kernels"] if k["kernel"] == kernel)


def worker(root) -> int:
    """A kernel other than the head that is up."""
    return max(up_kernels(root))


def ray_kill(cluster, kernel: int, restart: bool = True) -> None:
    code = ("import ray; ray.init(address=%r, namespace='llmos', logging_level='ERROR'); "
            "ray.kill(ray.get_actor('llmos-kernel-%d'), no_restart=%r)" % (cluster.info()["address"], kernel,
                                                                           not restart))
    subprocess.run([sys.executable, "-c", code], env={**cluster.env, "RAY_AUTH_MODE": "token"}, check=True,
                   timeout=120, capture_output=True)


def sampled(i: int, **kw) -> dict:
    return dict(prompt_ids=prompt_of(8 + i % 5, offset=i), temperature=0.9, seed=100 + i, **kw)


def test_greedy_through_the_front_equals_generate_on_every_kernel(cluster, root):
    model = str(cluster.state / "models" / "llmos-tiny-random")
    prompt = prompt_of(9)
    want = hf_greedy(model, prompt, 12)
    for k in up_kernels(root):
        pid = root.spawn(prompt_ids=prompt, max_tokens=12, node=str(k), **GREEDY)
        assert root.pinfo(pid)["kernel"] == k
        assert root.wait(pid)["token_ids"] == want


def test_ps_kill_wait_fork_read_work_across_kernels(root):
    a, b = up_kernels(root)[:2]
    pa = root.spawn(prompt="a long story", max_tokens=400, node=str(a))
    pb = root.spawn(prompt="another story", max_tokens=24, node=str(b), **GREEDY)
    rows = {r["pid"]: r for r in root.ps()}
    assert rows[pa]["kernel"] == a and rows[pb]["kernel"] == b and pa != pb
    streamed = [t for frame in root.read(pb) for t in frame["token_ids"]]
    assert streamed == root.wait(pb)["token_ids"] and len(streamed) == 24
    root.kill(pa, sig="STOP")
    kids = root.fork(pa, n=2, seed=7, temperature=0.8)
    assert {root.pinfo(k)["kernel"] for k in kids} == {a}
    assert root.pinfo(kids[0])["placement"]["reason"] == "fork" and root.pinfo(kids[0])["ppid"] == pa
    assert root.nice(pa, value=5)["pid"] == pa
    for pid in (pa, *kids):
        root.kill(pid, sig="KILL")
        assert root.wait(pid)["finish_reason"] == "killed"
    assert errno_of(root.pinfo, pa) == "ESRCH"                  # reaped: gone from the cluster
    assert errno_of(root.wait, 999_999) == "ESRCH"


def test_users_added_at_the_front_work_on_every_kernel(cluster, root):
    token = root.user_add(name="alice")["token"]
    mine = root.spawn(prompt="root's", max_tokens=200, node=str(worker(root)))
    with cluster.client(token) as alice:
        assert alice.whoami()["user"] == "alice"
        pids = [alice.spawn(prompt="hi", max_tokens=4, node=str(k)) for k in up_kernels(root)]
        assert [alice.wait(p)["usage"]["completion_tokens"] for p in pids] == [4] * len(pids)
        assert errno_of(alice.kill, mine) == "ESRCH"            # another user's process, on another kernel
        assert all(r["user"] == "alice" for r in alice.ps())
        assert errno_of(alice.cluster_drain, kernel=1) == "EPERM"
        assert errno_of(alice.user_add, name="mallory") == "EPERM"
    root.kill(mine, sig="KILL")
    root.wait(mine)


def test_every_kernel_reaches_the_heads_services(root):
    """Facts from the graph, feedback into the file store, images in it: from a process on a
    kernel that runs no services (its service calls go to the head's, as the caller)."""
    k = worker(root)
    root.call("kg_add", triples=[["Ada", "works_at", "Acme"]])
    pid = root.spawn(prompt="Where does Ada work?", max_tokens=4, kg=True, node=str(k))
    info = root.pinfo(pid)
    assert info["kernel"] == k and any("Acme" in f for f in info["kg_facts"])
    root.wait(pid)
    rated = root.spawn(prompt="Rate me", max_tokens=4, interactive=True, node=str(k))
    wait_for(lambda: root.pinfo(rated)["state"] != "RUNNING" and root.pinfo(rated)["tokens_out"] == 4)
    assert root.feedback(rated, rating=1, correction="better")["records"] >= 1
    records = root.call("fs_get", path="feedback.jsonl")
    assert '"correction": "better"' in (records.decode() if isinstance(records, bytes) else records)
    saved = root.checkpoint(rated, path="images/rated")
    assert saved["pid"] == rated and saved["size"] > 0
    back = root.restore(path="images/rated")
    assert root.pinfo(back)["tokens_out"] == 4                     # read from the store, wherever it runs
    for p in (rated, back):
        root.kill(p, sig="KILL")
        root.wait(p)


def test_spawns_sharing_a_prefix_go_where_it_is_cached(root):
    system = "You are a careful assistant who answers in one short sentence. " * 3
    first = root.spawn(prompt=system + "Question one?", max_tokens=2)
    home = root.pinfo(first)["kernel"]
    root.wait(first)
    later = [root.spawn(prompt=system + f"Question {i}?", max_tokens=2) for i in range(3)]
    infos = [root.pinfo(p) for p in later]
    assert {i["kernel"] for i in infos} == {home}
    assert all(i["placement"]["reason"] == "prefix" for i in infos)
    assert all(root.wait(p)["usage"]["cached_tokens"] > 0 for p in later)


def test_bad_input_through_the_front_gets_clear_errors(cluster, root):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(cluster.socket)
    s.send(b"\xc1 not msgpack")
    s.send_multipart([b"two", b"frames"])
    s.send(msgpack.packb({"v": 1, "id": 5, "call": "spawn", "args": {1: 2}, "token": cluster.token}))
    assert s.poll(30_000)
    assert msgpack.unpackb(s.recv(), raw=False, strict_map_key=False)["error"]["errno"] == "EPROTO"
    s.close(0)
    assert errno_of(root.call, "no_such_call") == "ENOSYS"
    assert errno_of(root.call, "wait", pid="seven") == "EINVAL"
    assert errno_of(root.call, "users_sync") == "EPERM"
    assert errno_of(root.spawn, prompt="x", node="no-such-node") == "EINVAL"
    with cluster.client("llmos_not_a_token") as bad:
        assert errno_of(bad.ps) == "EACCES"
    assert root.nop()["boot_id"]                                # and the front still serves


def test_example_programs_and_the_gateway_run_unchanged(cluster, root, monkeypatch, capsys):
    from llmos.userland.programs import feedback_tune, parallel_sampling, sentiment_monitor, support_bot
    token = root.user_add(name="prog")["token"]
    wait_for(lambda: {s["name"] for s in root.svc_list() if s["state"] == "up"} >= {"fs", "kg", "tuner"}, timeout=120)
    monkeypatch.setenv("LLMOS_SOCKET", cluster.socket)
    monkeypatch.setenv("LLMOS_TOKEN", token)
    assert parallel_sampling.main(["-n", "4", "--seed", "3", "--max-tokens", "8"]) == 0
    assert "4 distinct samples of 4" in capsys.readouterr().out
    assert support_bot.main(["--seed", "How much does the Nimbus X2 cost?"]) == 0
    assert "- Nimbus X2 costs $999." in capsys.readouterr().out
    assert sentiment_monitor.main(["--reviews", "8", "--max-tokens", "8"]) == 0
    assert "finished before the chat's first token" in capsys.readouterr().out
    assert feedback_tune.main(["--name", "fb-cluster"]) == 0     # feedback, a tuner job, its adapter
    assert "4 of 4 tuned answers equal their corrections" in capsys.readouterr().out
    with cluster.client(token) as c:                             # the tuned adapter, on every kernel
        answers = {c.wait(c.spawn(prompt="What is the capital of France?", adapter="adapters/fb-cluster",
                                  max_tokens=16, node=str(k)))["text"] for k in up_kernels(root)}
    assert answers == {" Paris"}
    import socket as _socket
    import uvicorn
    from llmos.userland.gateway import make_app
    with _socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(cluster.socket, default_token=None), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=30)
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0, timeout=120)
        hello = [{"role": "user", "content": "Hello there"}]
        r = oai.chat.completions.create(model="llmos-tiny-random", messages=hello, max_tokens=10, temperature=0)
        with cluster.client(token) as c:
            assert r.choices[0].message.content == c.wait(c.spawn(messages=hello, max_tokens=10, temperature=0.0))["text"]
        names = [m.id for m in oai.models.list().data]
        assert names.count("llmos-tiny-random") == 1            # one row per model, not per kernel
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code in (200, 404)
    finally:
        server.should_exit = True
        thread.join(10)


def test_drain_moves_20_live_processes_with_identical_output(cluster, root):
    ref_kernel, victim = up_kernels(root)[0], worker(root)
    refs = [root.spawn(max_tokens=120, node=str(ref_kernel), **sampled(i)) for i in range(20)]
    want = [root.wait(p)["token_ids"] for p in refs]
    pids = [root.spawn(max_tokens=120, node=str(victim), stopped=i % 2 == 0, **sampled(i)) for i in range(20)]
    got: list[int] = []

    def read():
        with cluster.client() as c:
            got.extend(t for f in c.read(pids[1]) for t in f["token_ids"])
    reader = threading.Thread(target=read)
    reader.start()
    r = root.cluster_drain(kernel=victim)
    assert r["kernels"] == [victim] and r["failed"] == [] and len(r["moved"]) >= 10
    assert all(root.pinfo(p)["kernel"] != victim for p in r["moved"])
    assert all(root.pinfo(p)["placement"]["reason"] == "migrated" for p in r["moved"])
    for p in pids[::2]:
        root.kill(p, sig="CONT")
    assert [root.wait(p)["token_ids"] for p in pids] == want
    reader.join(60)
    assert got == want[1]                                        # a reader across the move sees each token once
    assert victim not in up_kernels(root)
    assert len(root.cluster_add(n=1)["kernels"]) == 1             # the freed bundle takes a new kernel
    assert len(up_kernels(root)) == 3


def test_a_killed_kernel_actor_comes_back_and_its_processes_continue(cluster, root):
    ref_kernel, victim = up_kernels(root)[0], worker(root)
    refs = [root.spawn(max_tokens=200, node=str(ref_kernel), **sampled(i)) for i in range(4)]
    want = [root.wait(p)["token_ids"] for p in refs]
    pids = [root.spawn(max_tokens=200, node=str(victim), **sampled(i)) for i in range(4)]
    before = {k["kernel"]: k["restarts"] for k in root.cluster()["kernels"]}
    ray_kill(cluster, victim)
    wait_for(lambda: row_of(root, victim)["state"] != "up", timeout=60)
    other = root.spawn(prompt="meanwhile", max_tokens=3, node=str(ref_kernel))   # the others serve on
    assert root.wait(other)["usage"]["completion_tokens"] == 3
    assert [root.wait(p, _timeout=300)["token_ids"] for p in pids] == want
    row = row_of(root, victim)
    assert row["state"] == "up" and row["restarts"] == before[victim] + 1


def test_a_kernel_lost_for_good_fails_only_its_processes(cluster, root):
    victim, keep = worker(root), up_kernels(root)[0]
    lost = root.spawn(prompt="doomed", max_tokens=400, node=str(victim))
    safe = root.spawn(prompt="fine", max_tokens=30, node=str(keep), **GREEDY)
    ray_kill(cluster, victim, restart=False)
    wait_for(lambda: row_of(root, victim)["state"] == "gone", timeout=60)
    assert errno_of(root.wait, lost) == "EHOSTDOWN"
    assert root.wait(safe)["usage"]["completion_tokens"] == 30
    assert root.cluster_add(n=1)["kernels"]


def test_cluster_status_on_the_command_line(cluster):
    done = cluster.llmos("cluster", "status")
    assert done.returncode == 0, done.stderr
    assert "KERNEL" in done.stdout and done.stdout.count(" up ") >= 2
    assert '"kernels"' in cluster.llmos("cluster", "status", "--json").stdout



def pid_saved(cluster, pid: int) -> bool:
    from llmos.cluster.pids import PidTable
    table = PidTable()
    table.load(cluster.state / "front" / "pids")
    return table.get(pid) is not None


def front_pid(cluster) -> int | None:
    try:
        return int((cluster.state / "front.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def test_a_crashed_front_comes_back_with_the_kernels_and_every_pid(cluster, root):
    """Last here: the module's client then talks to a new front (its supervisor started it)."""
    import signal
    pid = root.spawn(prompt="a long one", max_tokens=300, node=str(worker(root)), stopped=True)
    wait_for(lambda: pid_saved(cluster, pid), timeout=30)        # at the front's next tick
    old = front_pid(cluster)
    os.kill(old, signal.SIGKILL)

    def back():
        try:
            with cluster.client(timeout=5) as c:
                return front_pid(cluster) not in (None, old) and c.pinfo(pid)
        except Exception:
            return None
    wait_for(back, timeout=240, every=0.5)
    with cluster.client() as c:
        assert c.pinfo(pid)["state"] == "STOPPED" and len(up_kernels(c)) == 3
        c.kill(pid, sig="CONT")
        assert c.wait(pid)["usage"]["completion_tokens"] == 300
        assert c.spawn(prompt="new", max_tokens=2) > pid          # numbering goes on


def test_a_front_can_be_replaced_by_hand(cluster):
    """When the supervisor is gone too: cluster up --address starts one that adopts the kernels."""
    import signal
    with cluster.client() as c:
        pid = c.spawn(prompt="kept", max_tokens=5, stopped=True)
    wait_for(lambda: pid_saved(cluster, pid), timeout=30)
    info = cluster.info()
    os.kill(info["front_pid"], signal.SIGKILL)                   # the supervisor first, then its front
    os.kill(front_pid(cluster), signal.SIGKILL)
    done = cluster.llmos("cluster", "up", "--address", info["address"], *cluster.args)
    assert done.returncode == 0, done.stderr
    assert cluster.info()["front_pid"] != info["front_pid"] and cluster.info()["ray_head_pid"] == info["ray_head_pid"]
    with cluster.client() as c:
        c.kill(pid, sig="CONT")
        assert c.wait(pid)["usage"]["completion_tokens"] == 5
