"""Process syscalls as users meet them: isolation, quotas, bad input, signals, streams, restarts."""
import signal
import threading
import time

import pytest

from conftest import KernelProc, errno_of
from fixtures_models import prompt_of, tiny_models  # noqa: F401
from llmos import SyscallError

ARGS = ("--device", "cpu", "--dtype", "float32", "--kv-blocks", "64", "--block-size", "4")


@pytest.fixture
def k(start_kernel, tiny_models):
    return start_kernel(*ARGS, "--max-procs-per-user", "3", "--kv-quota-blocks", "20", model=tiny_models["llama"])


def test_another_users_processes_are_invisible_and_untouchable(k):
    with k.client() as root:
        alice = k.client(root.user_add("alice")["token"])
        bob = k.client(root.user_add("bob")["token"])
    pid = alice.spawn(prompt_ids=prompt_of(5), max_tokens=60, ignore_eos=True, interactive=True)
    assert [p["pid"] for p in alice.ps()] == [pid] and bob.ps() == []
    for call, args in (("pinfo", {}), ("kill", {}), ("nice", {"value": 5}), ("wait", {}), ("fork", {}),
                       ("read", {})):
        assert errno_of(bob.call, call, pid=pid, **args) == "ESRCH", call
    with k.client() as root:                      # root sees and may touch everyone's
        assert pid in [p["pid"] for p in root.ps(all=True)]
        assert root.pinfo(pid)["user"] == "alice"
    alice.kill(pid, "KILL")
    assert alice.wait(pid)["finish_reason"] == "killed"


def test_bad_spawns_are_refused_with_clear_errors(k):
    with k.client() as root:
        c = k.client(root.user_add("carol")["token"])
    assert errno_of(c.spawn, model="no-such-model", prompt="hi") == "ENOENT"
    assert errno_of(c.spawn, prompt="hi", prompt_ids=[1, 2]) == "EINVAL"        # two inputs
    assert errno_of(c.spawn) == "EINVAL"                                       # no input
    assert errno_of(c.spawn, prompt_ids=[10] * 300) == "EINVAL"                # longer than the context (64*4)
    assert errno_of(c.spawn, prompt_ids=[10], max_tokens=0) == "EINVAL"
    assert errno_of(c.spawn, prompt_ids=[10], temperature=-1.0) == "EINVAL"
    assert errno_of(c.spawn, prompt_ids=[10], top_p=0.0) == "EINVAL"
    assert errno_of(c.spawn, prompt_ids=[10], priority=-21) == "EINVAL"
    assert errno_of(c.spawn, prompt_ids=[10**9]) == "EINVAL"                   # not a token id
    assert errno_of(c.spawn, messages=[{"role": 1}]) == "EINVAL"
    assert errno_of(c.spawn, prompt_ids=[10], stop=[""]) == "EINVAL"
    assert errno_of(c.spawn, prompt_ids=[10], max_tokens=200) == "ENOMEM"     # over the 20-block KV quota
    pids = [c.spawn(prompt_ids=[10], max_tokens=50, ignore_eos=True) for _ in range(3)]
    assert errno_of(c.spawn, prompt_ids=[10]) == "EAGAIN"                     # process quota of 3
    for pid in pids:
        c.wait(pid)
    assert c.spawn(prompt_ids=[10], max_tokens=2) > 0                         # reaped: room again


def test_signals_to_dead_and_reaped_pids_are_esrch(k):
    with k.client() as c:
        pid = c.spawn(prompt_ids=prompt_of(4), max_tokens=3)
        r = c.wait(pid)
        assert r["pid"] == pid and len(r["token_ids"]) <= 3
        for sig in ("TERM", "KILL", "STOP", "CONT"):
            assert errno_of(c.kill, pid, sig) == "ESRCH"
        assert errno_of(c.wait, pid) == "ESRCH"
        assert errno_of(c.write, 424242, text="x") == "ESRCH"


def test_write_needs_an_interactive_process_between_turns(k):
    with k.client() as c:
        pid = c.spawn(prompt_ids=prompt_of(4), max_tokens=500, ignore_eos=True)
        assert errno_of(c.write, pid, text="more") == "EBUSY"
        c.kill(pid, "TERM")
        assert c.wait(pid)["finish_reason"] == "terminated"


def test_wait_with_timeout_expires_without_reaping(k):
    with k.client() as c:
        pid = c.spawn(prompt_ids=prompt_of(4), max_tokens=10, interactive=True, ignore_eos=True)
        c.kill(pid, "STOP")
        t0 = time.monotonic()
        assert errno_of(c.wait, pid, timeout=0.3) == "ETIMEDOUT"
        assert 0.25 < time.monotonic() - t0 < 3
        c.kill(pid, "CONT")
        assert c.wait(pid)["pid"] == pid


def test_nice_changes_priority_and_ps_shows_it(k):
    with k.client() as c:
        pid = c.spawn(prompt_ids=prompt_of(4), max_tokens=300, ignore_eos=True)
        assert c.nice(pid, 7) == {"pid": pid, "nice": 7}
        row = [p for p in c.ps() if p["pid"] == pid][0]
        assert row["nice"] == 7 and row["state"] in ("READY", "RUNNING")
        assert {"tokens_in", "tokens_out", "kv_blocks", "kv_swapped", "age_s", "model", "user"} <= set(row)
        c.kill(pid, "KILL")
        c.wait(pid)


def test_stop_strings_end_the_turn_and_are_cut(k):
    with k.client() as c:
        free = c.wait(c.spawn(prompt_ids=prompt_of(6), max_tokens=30, ignore_eos=True))
        text = free["text"]
        stop = text[10:14] if len(text) > 14 and text[10:14].strip() else text[-3:]
        r = c.wait(c.spawn(prompt_ids=prompt_of(6), max_tokens=30, ignore_eos=True, stop=[stop]))
        assert r["finish_reason"] == "stop"
        assert r["text"] == text[:text.find(stop)]
        streamed = "".join(f["text"] for f in c.read(c.spawn(prompt_ids=prompt_of(6), max_tokens=30,
                                                                ignore_eos=True, stop=[stop])))
        assert streamed == r["text"]              # the stream never showed the stop string


def test_a_client_that_disconnects_mid_stream_leaves_nothing_behind(k):
    with k.client() as c:
        pid = c.spawn(prompt_ids=prompt_of(5), max_tokens=60, ignore_eos=True)
    gone = k.client()
    stream = gone.read(pid)
    next(stream)
    gone.close()                                  # vanish mid-stream
    with k.client() as c:
        r = c.wait(pid, _timeout=60)              # the process ran on and is reaped normally
        assert len(r["token_ids"]) == 60
        assert c.ps() == [] and c.meminfo()["blocks_used"] == 0


@pytest.mark.parametrize("resume", [True, False])
def test_a_wait_goes_on_across_a_kernel_restart_or_reports_it(start_kernel, tiny_models, resume):
    """The journal brings the STOPPED process back; the client's wait resumes on the new kernel
    and ends when the process does. Without resuming it reports the restart, never hangs."""
    kp = start_kernel(*ARGS, model=tiny_models["llama"])
    c = kp.client()
    pid = c.spawn(prompt_ids=prompt_of(5), max_tokens=10, interactive=True)
    c.kill(pid, "STOP")                           # the wait below cannot end before the restart
    got = []

    def waiter():
        try:
            got.append(c.wait(pid, resume=60.0 if resume else 0))
        except SyscallError as e:
            got.append(e.errno)

    t = threading.Thread(target=waiter)
    t.start()
    with kp.client() as other:                    # the wait is in the kernel before it dies
        deadline = time.monotonic() + 30
        while other.stat()["calls"].get("wait", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    kp.stop(signal.SIGKILL)
    again = KernelProc(*ARGS, model=tiny_models["llama"], state=kp.state).start()   # same socket, new boot
    try:
        with again.client() as c2:
            assert c2.pinfo(pid)["state"] == "STOPPED"
            if resume:
                c2.kill(pid, "CONT")
        t.join(60)
        assert not t.is_alive()
        assert got == ["ECONNRESET"] if not resume else got[0]["pid"] == pid
    finally:
        again.stop()


def test_shutdown_cancels_pending_waits(k):
    c = k.client()
    pid = c.spawn(prompt_ids=prompt_of(5), max_tokens=10, interactive=True)
    c.kill(pid, "STOP")
    err = []
    t = threading.Thread(target=lambda: err.append(errno_of(c.wait, pid)))
    t.start()
    time.sleep(0.3)
    with k.client() as root:
        root.shutdown()
    t.join(30)
    assert err == ["ECANCELED"]


def test_a_process_spawned_stopped_forks_at_its_prompt_into_seeded_samples(k):
    """n-way sampling by fork: stop at the prompt, fork, CONT; each sample equals a spawn with its seed."""
    args = dict(prompt_ids=prompt_of(9, 3), max_tokens=6, temperature=1.0, ignore_eos=True)
    with k.client() as c:
        pid = c.spawn(**args, seed=7, stopped=True)
        time.sleep(0.2)
        assert c.pinfo(pid)["state"] == "STOPPED" and c.pinfo(pid)["tokens_out"] == 0
        kids = c.fork(pid, n=2, seed=8)
        c.kill(pid, "CONT")
        results = [c.wait(p) for p in [pid, *kids]]
        forked = [r["token_ids"] for r in results]
        alone = [c.wait(c.spawn(**args, seed=s))["token_ids"] for s in (7, 8, 9)]
        assert forked == alone and len({tuple(x) for x in forked}) == 3
        # the prompt's 2 full blocks were computed once: the other two reused them
        assert sorted(r["usage"]["cached_tokens"] for r in results) == [0, 8, 8]


def test_kill_of_a_process_someone_is_waiting_for_answers_both(k):
    with k.client() as c, k.client() as waiter:
        pid = c.spawn(prompt_ids=prompt_of(5, 1), max_tokens=50, ignore_eos=True, stopped=True)
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("r", waiter.wait(pid)))
        t.start()
        time.sleep(0.3)
        assert c.kill(pid, "KILL") is True        # was EIO: the wait reaped it inside kill
        t.join(30)
        assert got["r"]["finish_reason"] == "killed"
        assert errno_of(c.kill, pid) == "ESRCH"


def test_int_ends_a_turn_but_keeps_an_interactive_process(k):
    with k.client() as c:
        pid = c.spawn(prompt_ids=prompt_of(5, 2), max_tokens=50, ignore_eos=True, interactive=True, stopped=True)
        c.kill(pid, "INT")
        info = c.pinfo(pid)
        assert info["state"] == "BLOCKED" and info["finish_reason"] == "interrupted"
        c.write(pid, ids=prompt_of(3, 4), max_tokens=4)
        assert [f for f in c.read(pid)][-1]["finish_reason"] == "length"     # the next turn runs
        one = c.spawn(prompt_ids=prompt_of(5, 2), max_tokens=50, ignore_eos=True, stopped=True)
        c.kill(one, "INT")                                                   # not interactive: ends
        assert c.wait(one)["finish_reason"] == "terminated"
        c.kill(pid, "KILL")
        c.wait(pid)


def test_negative_nice_needs_the_prio_capability(k):
    with k.client() as root:
        plain = root.user_add(name="plain", caps=["proc"])["token"]
        pid = root.spawn(prompt_ids=prompt_of(3, 1), max_tokens=2, priority=-5)     # root may
        root.wait(pid)
    with k.client(plain) as c:
        assert errno_of(c.spawn, prompt_ids=prompt_of(3, 1), max_tokens=2, priority=-1) == "EPERM"
        pid = c.spawn(prompt_ids=prompt_of(3, 1), max_tokens=2, priority=3, stopped=True)
        assert errno_of(c.nice, pid, -2) == "EPERM"
        assert c.nice(pid, 10)["nice"] == 10                                         # lowering is fine
        c.kill(pid, "KILL")
        c.wait(pid)
