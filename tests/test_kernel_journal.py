"""Durable processes (issue 14): the journal brings every live process back after a crash or a
clean stop, exactly where it was; streams resume; a damaged journal never stops a boot."""
import os
import signal
import time

import pytest

from conftest import KernelProc, errno_of
from test_cli import llmos
from fixtures_models import prompt_of, tiny_models  # noqa: F401
from llmos import SyscallError
from llmos.drivers.batch import SamplingParams
from llmos.kernel.journal import Journal
from llmos.kernel.proc import Process, ProcState
from llmos.kernel.procio import ProcIO

ARGS = ("--device", "cpu", "--dtype", "float32", "--kv-blocks", "256", "--block-size", "4")
NEW = 24


# ----- the journal alone -----
def _proc(pid, tokens, **kw):
    p = Process(pid=pid, model="m", token_ids=list(tokens), sampling=SamplingParams(temperature=0.5, seed=pid), **kw)
    p.io = ProcIO(decode=lambda ids: "", stop=("END",))
    return p


def test_commits_replay_to_the_last_state_of_every_process(tmp_path):
    j = Journal(tmp_path)
    j.open([], 1)
    a, b = _proc(1, [5, 6, 7]), _proc(2, [9])
    j.commit([a, b], 3)
    a.token_ids += [8, 9]
    a.stop()
    b.token_ids.append(4)
    assert j.commit([a, b], 3)
    assert not j.commit([a, b], 3)                       # nothing changed: nothing written
    j.commit([a], 4)                                     # b was reaped
    j.close()
    saved, next_pid, damage = Journal(tmp_path).replay()
    assert damage is None and next_pid == 4 and [s.pid for s in saved] == [1]
    assert saved[0].token_ids == [5, 6, 7, 8, 9] and saved[0].fields["state"] == "stopped"
    assert saved[0].fields["sampling"] == {"temperature": 0.5, "top_p": 1.0, "top_k": 0,
                                           "repetition_penalty": 1.0, "seed": 1}
    assert saved[0].fields["stop"] == ["END"]


@pytest.mark.parametrize("damage", ["torn", "corrupt", "foreign"])
def test_a_damaged_journal_keeps_what_precedes_the_damage(tmp_path, damage):
    j = Journal(tmp_path)
    j.open([], 1)
    a = _proc(1, [5, 6])
    j.commit([a], 2)
    size = j.path.stat().st_size
    a.token_ids += [7, 8]
    j.commit([a], 2)
    j.close()
    data = bytearray(j.path.read_bytes())
    if damage == "torn":
        data = data[:-3]
    elif damage == "corrupt":
        data[size + 9] ^= 0xFF
    else:
        data = bytearray(os.urandom(200))
    j.path.write_bytes(bytes(data))
    saved, _, reason = Journal(tmp_path).replay()
    assert "cut off" in reason
    assert [s.token_ids for s in saved] == ([] if damage == "foreign" else [[5, 6]])


def test_opening_compacts_the_log_to_one_snapshot_per_process(tmp_path):
    j = Journal(tmp_path)
    j.open([], 1)
    a = _proc(1, [1])
    for i in range(200):
        a.token_ids.append(i)
        j.commit([a], 2)
    j.close()
    grown = j.path.stat().st_size
    saved, next_pid, _ = Journal(tmp_path).replay()
    again = Journal(tmp_path)
    again.open([_proc(1, saved[0].token_ids)], next_pid)
    again.close()
    assert j.path.stat().st_size < grown / 5
    assert Journal(tmp_path).replay()[0][0].token_ids == [1] + list(range(200))


# ----- a kernel that dies -----
def _kernel(path, state=None, *extra):
    return KernelProc(*ARGS, *extra, model=path, state=state).start()


def _workload(c):
    """32 processes of every kind, mid-flight: greedy, seeded sampling, interactive with two
    turns behind it, STOPPED, forks of a stopped parent sharing its prompt, one waiting for its
    model to load (``other``)."""
    g = dict(ignore_eos=True, max_tokens=NEW)
    pids = {}
    for i in range(13):
        pids[f"greedy{i}"] = c.spawn(prompt_ids=prompt_of(6 + 3 * i, i), temperature=0.0, **g)
    pids["faulted"] = c.spawn(model="other", prompt_ids=prompt_of(11, 44), temperature=0.0, **g)   # a page fault
    for i in range(8):
        pids[f"sampled{i}"] = c.spawn(prompt_ids=prompt_of(9, 50 + i), temperature=0.9, top_p=0.95, seed=100 + i, **g)
    for i in range(2):
        pid = pids[f"chat{i}"] = c.spawn(prompt_ids=prompt_of(7, 70 + i), temperature=0.0, interactive=True,
                                         max_tokens=6, ignore_eos=True)
        list(c.read(pid))
        c.write(pid, ids=prompt_of(3, 80 + i))
        list(c.read(pid))                                # two turns of history, waiting for the third
    for i in range(2):
        pids[f"stopped{i}"] = c.spawn(prompt_ids=prompt_of(8, 90 + i), temperature=0.0, stopped=True, **g)
    parent = pids["parent"] = c.spawn(prompt_ids=prompt_of(16, 99), temperature=0.8, seed=7, stopped=True, **g)
    for i, child in enumerate(c.fork(parent, n=5, seed=200)):
        pids[f"fork{i}"] = child
    return pids


def _finish(c, pids):
    """Run everything to its end; the chats get a third turn."""
    for name in [n for n in pids if n.startswith(("stopped", "parent"))]:
        c.kill(pids[name], "CONT")
    out = {}
    for i in range(2):
        c.write(pids[f"chat{i}"], ids=prompt_of(4, 60 + i))
        # the tokens, not how they were framed: how many a frame carries depends on timing
        out[f"chat{i}"] = [t for f in c.read(pids[f"chat{i}"]) for t in f["token_ids"]]
    for name, pid in pids.items():
        r = c.wait(pid, _timeout=300)
        out[name] = r["token_ids"] if not name.startswith("chat") else out[name]
    return out


def test_a_sigkilled_kernel_brings_back_every_process_and_each_ends_as_if_nothing_happened(tiny_models, tmp_path):
    import shutil
    path, other = tiny_models["llama"], tmp_path / "other"
    shutil.copytree(tiny_models["qwen2"], other)
    alias = ("--alias", f"other={other}")
    ref = _kernel(path, None, *alias)
    try:
        with ref.client() as c:
            expected = _finish(c, _workload(c))
    finally:
        ref.cleanup()
    k = _kernel(path, None, *alias)
    try:
        with k.client() as c:
            pids = _workload(c)
            assert len(pids) == 32
            watched, seen = pids["greedy12"], []
            stream = c.read(watched)
            while len(seen) < 4:                          # mid-flight: it has streamed some tokens
                seen += next(stream)["token_ids"]
            k.stop(signal.SIGKILL)
            k.start()
            for frame in stream:                          # the same stream, resumed by the client
                seen += frame["token_ids"]
            states = {p["pid"]: p["state"] for p in c.ps()}
            assert states[pids["stopped0"]] == states[pids["parent"]] == "STOPPED"
            assert states[pids["chat0"]] == "BLOCKED"
            got = _finish(c, pids)
            assert c.stat()["journal"]["restored"] == 32
    finally:
        k.cleanup()
    assert seen == expected["greedy12"]                   # every token once, none torn
    assert got == expected


def test_a_clean_stop_checkpoints_and_discard_drops(tiny_models):
    """``llmos kernel stop`` (its process a zombie of this test until reaped: not a kernel)."""
    path = tiny_models["llama"]
    k = _kernel(path)
    try:
        with k.client() as c:
            pid = c.spawn(prompt_ids=prompt_of(9), max_tokens=NEW, ignore_eos=True, stopped=True)
        assert "come back at the next start" in llmos(k, "kernel", "stop").stdout
        k.proc.wait(60)
        k.start()
        with k.client() as c:
            assert c.pinfo(pid)["state"] == "STOPPED"
        assert "dropped" in llmos(k, "kernel", "stop", "--discard").stdout
        k.proc.wait(60)
        k.start()
        with k.client() as c:
            assert c.ps() == []
    finally:
        k.cleanup()


def test_drain_waits_for_running_processes_and_keeps_the_interactive_one(tiny_models):
    path = tiny_models["llama"]
    k = _kernel(path)
    try:
        with k.client() as c:
            busy = c.spawn(prompt_ids=prompt_of(9), max_tokens=300, ignore_eos=True)
            chat = c.spawn(prompt_ids=prompt_of(5), max_tokens=4, interactive=True)
            list(c.read(chat))
            c.shutdown(mode="drain")
            assert errno_of(c.spawn, prompt_ids=prompt_of(3)) == "EAGAIN"     # 300 tokens to go
        k.proc.wait(120)
        k.start()
        with k.client() as c:
            assert c.wait(busy)["finish_reason"] == "length"    # it ended before the stop: a zombie kept
            assert c.pinfo(chat)["state"] == "BLOCKED"
    finally:
        k.cleanup()


def test_a_process_whose_model_is_gone_is_listed_as_lost(tiny_models, tmp_path):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    k = _kernel(tiny_models["llama"], None, "--alias", f"other={model}")
    try:
        with k.client() as c:
            pid = c.spawn(model="other", prompt_ids=prompt_of(5), max_tokens=NEW, stopped=True)
        k.stop(signal.SIGKILL)
        k.args = [a for a in k.args if a not in ("--alias", f"other={model}")]
        k.start()
        with k.client() as c:
            (lost,) = c.ps(lost=True)
            assert lost["pid"] == pid and lost["model"] == "other" and "unknown model" in lost["reason"]
            assert c.stat()["journal"]["lost"] == 1
        assert f"{pid}  other: unknown model" in llmos(k, "ps", "--lost").stdout
    finally:
        k.cleanup()


def test_killed_at_twenty_random_moments_no_acknowledged_spawn_or_write_is_lost_nor_a_token_torn(tiny_models):
    """20 SIGKILLs, each at a random point of a workload (after a random number of streamed
    frames): every spawn and write the kernel acknowledged is there after the restart, and a
    stream read across all of them equals the process's final output — no token lost, torn or
    twice. Each process's output equals that of a fresh, uninterrupted spawn."""
    import random
    rng = random.Random(14)
    path = tiny_models["llama"]
    k = _kernel(path)
    acked, turns = [], []
    try:
        with k.client() as c:
            chat = c.spawn(prompt_ids=prompt_of(5, 3), max_tokens=4, interactive=True, ignore_eos=True)
            watched = c.spawn(prompt_ids=prompt_of(7, 1), max_tokens=400, ignore_eos=True)
            stream, seen = c.read(watched), []
            for round_ in range(20):
                acked += [c.spawn(prompt_ids=prompt_of(4 + round_ % 7, round_), max_tokens=8 + round_,
                                  ignore_eos=True, temperature=0.7, seed=round_) for _ in range(2)]
                if c.pinfo(chat)["state"] == "BLOCKED":
                    ids = prompt_of(2, 30 + round_)
                    c.write(chat, ids=ids)
                    turns.append(ids)
                for _ in range(rng.randrange(4)):
                    frame = next(stream, None)          # None: it has ended (its final frame was read)
                    seen += frame["token_ids"] if frame else []
                k.stop(signal.SIGKILL)
                k.start()
                assert set(acked) <= {p["pid"] for p in c.ps()}, f"round {round_}: an acknowledged spawn is gone"
            for frame in stream:
                seen += frame["token_ids"]
            final = c.wait(watched)["token_ids"]
            history = c.pinfo(chat)
            results = {pid: c.wait(pid)["token_ids"] for pid in acked}
            fresh = {pid: c.wait(c.spawn(prompt_ids=prompt_of(4 + (i // 2) % 7, i // 2), max_tokens=8 + i // 2,
                                         ignore_eos=True, temperature=0.7, seed=i // 2))["token_ids"]
                     for i, pid in enumerate(acked)}
    finally:
        k.cleanup()
    assert seen == final and len(final) == 400
    assert history["num_tokens"] >= 5 + sum(len(t) for t in turns) + 4 * len(turns)   # every acked turn is in it
    assert results == fresh


# ----- checkpoint and restore -----
def test_checkpoint_then_restore_on_another_kernel_continues_token_for_token(tiny_models, tmp_path):
    import shutil
    path = tiny_models["llama"]
    a, b = _kernel(path), _kernel(path)
    try:
        with a.client() as c:
            whole = c.wait(c.spawn(prompt_ids=prompt_of(9, 5), max_tokens=NEW, temperature=0.8, seed=3,
                                   ignore_eos=True))["token_ids"]
            pid = c.spawn(prompt_ids=prompt_of(9, 5), max_tokens=NEW, temperature=0.8, seed=3, ignore_eos=True)
            stream, part = c.read(pid), []
            while len(part) < 5:
                part += next(stream)["token_ids"]
            c.kill(pid, "STOP")
            image = c.checkpoint(pid)
        assert image["model"]["hash"] and len(image["token_ids"]) >= 9 + 5
        with b.client() as c:
            new = c.restore(image)
            assert c.pinfo(new)["state"] == "STOPPED"          # as it was checkpointed
            c.kill(new, "CONT")
            rest = c.wait(new)["token_ids"]
        done = len(image["token_ids"]) - 9
        assert whole[:done] == image["token_ids"][9:] and rest == whole
        other = tmp_path / "other"                              # the same name, other weights
        shutil.copytree(tiny_models["qwen2"], other)
        k = _kernel(str(other))
        try:
            with k.client() as c:
                bad = {**image, "model": {**image["model"], "name": c.models()[0]["name"]}}
                with pytest.raises(SyscallError, match="is not the image's"):
                    c.restore(bad)
        finally:
            k.cleanup()
    finally:
        a.cleanup()
        b.cleanup()


def test_a_bad_image_is_refused_with_the_reason_and_an_image_is_the_callers(tiny_models):
    k = _kernel(tiny_models["llama"])
    try:
        with k.client() as root:
            pid = root.spawn(prompt_ids=prompt_of(6), max_tokens=NEW, stopped=True)
            image = root.checkpoint(pid)
            alice = k.client(token=root.user_add("alice")["token"])
            assert errno_of(alice.checkpoint, pid) == "ESRCH"         # another user's process
            bad = [{"format": "tar"}, {**image, "token_ids": [-1]}, {**image, "token_ids": "abc"},
                   {**image, "process": {**image["process"], "state": "zombie"}},
                   {**image, "process": {**image["process"], "nice": 99}},
                   {**image, "process": {**image["process"], "sampling": {"temperature": -5}}},
                   {**image, "process": None}, {**image, "model": {"name": "nope", "hash": "x"}}]
            for b in bad:
                assert errno_of(alice.restore, b) in ("EINVAL", "ENOENT"), b
            mine = alice.restore(image)                                # root's image, alice's process
            assert [p["pid"] for p in alice.ps()] == [mine] and alice.pinfo(mine)["user"] == "alice"
            root.kill(pid, "CONT")
            alice.kill(mine, "CONT")
            assert alice.wait(mine)["token_ids"] == root.wait(pid)["token_ids"]
    finally:
        k.cleanup()
