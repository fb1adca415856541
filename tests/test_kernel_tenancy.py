"""Many users on one kernel: process and KV quotas that hold across fork and write, fair share
between users, and what ``shares``, ``user_set`` and ``ps`` report."""
import json

import pytest

from conftest import errno_of
from fixtures_models import prompt_of, tiny_models  # noqa: F401

ARGS = ("--device", "cpu", "--dtype", "float32", "--block-size", "4")


def users(k, *names, **caps):
    with k.client() as root:
        return [k.client(root.user_add(n)["token"]) for n in names]


def test_fork_counts_against_the_process_quota(start_kernel, tiny_models):
    k = start_kernel(*ARGS, "--kv-blocks", "64", "--max-procs-per-user", "5", model=tiny_models["llama"])
    (alice,) = users(k, "alice")
    pid = alice.spawn(prompt_ids=prompt_of(6), max_tokens=2, interactive=True)
    alice.read(pid) and list(alice.read(pid))
    assert errno_of(alice.fork, pid, n=20) == "EAGAIN"          # the reproduction: 25 live before
    assert len(alice.ps()) == 1                                 # all or nothing
    kids = alice.fork(pid, n=4)
    assert len(alice.ps()) == 5
    assert errno_of(alice.fork, pid) == "EAGAIN"
    assert errno_of(alice.spawn, prompt_ids=prompt_of(3)) == "EAGAIN"
    for p in [pid, *kids]:
        alice.kill(p, "KILL")
        alice.wait(p)
    assert alice.spawn(prompt_ids=prompt_of(3), max_tokens=1) > 0


def test_the_kv_quota_is_a_total_that_write_and_fork_cannot_grow_past(start_kernel, tiny_models):
    k = start_kernel(*ARGS, "--kv-blocks", "64", "--kv-quota-blocks", "4", model=tiny_models["llama"])
    alice, bob = users(k, "alice", "bob")
    pid = alice.spawn(prompt_ids=prompt_of(10), max_tokens=2, interactive=True, ignore_eos=True)
    list(alice.read(pid))                                       # 12 tokens: 3 blocks, between turns
    kids = alice.fork(pid, n=8)
    [me] = alice.shares()
    assert me["kv_blocks"] <= 4 and me["kv_quota"] == 4          # was one more block per child
    assert k.client().meminfo()["blocks_used"] <= 4
    for kid in kids[:4]:                                        # every child takes a turn, in quota
        alice.write(kid, ids=[7], max_tokens=1)
    for kid in kids[:4]:
        assert alice.wait(kid)["finish_reason"] == "length"
        assert alice.shares()[0]["kv_blocks"] <= 4
    assert errno_of(alice.write, pid, ids=[7] * 10) == "ENOMEM"   # 23 tokens can never fit in 4 blocks
    alice.write(pid, ids=[7, 7], max_tokens=10)                 # fits now, outgrows the quota later
    r = alice.wait(pid)
    assert r["finish_reason"] == "quota" and len(r["token_ids"]) == 3     # 17 tokens: a 5th block
    assert bob.wait(bob.spawn(prompt_ids=prompt_of(9), max_tokens=4))["finish_reason"] == "length"
    for kid in kids[4:]:
        alice.kill(kid, "KILL")
        alice.wait(kid)
    assert alice.shares()[0]["kv_blocks"] == 0


def test_a_second_users_request_does_not_wait_behind_the_first_users_queue(start_kernel, tiny_models):
    k = start_kernel(*ARGS, "--kv-blocks", "128", "--max-num-seqs", "4", model=tiny_models["llama"])
    alice, bob = users(k, "alice", "bob")
    flood = [alice.spawn(prompt_ids=prompt_of(4, offset=i), max_tokens=64, ignore_eos=True) for i in range(24)]
    with k.client() as root:
        before = root.stat()["steps"]
        r = bob.wait(bob.spawn(prompt_ids=prompt_of(8), max_tokens=16, ignore_eos=True))
        steps = root.stat()["steps"] - before
    assert len(r["token_ids"]) == 16
    assert steps < 60, steps                  # behind alice's queue it would be hundreds of steps
    assert sum(1 for p in alice.ps() if p["state"] != "ZOMBIE") > 4     # alice's flood was still on
    for pid in flood:
        alice.kill(pid, "KILL")
        alice.wait(pid)


def test_shares_are_set_by_root_listed_and_saved(start_kernel, tiny_models):
    k = start_kernel(*ARGS, "--kv-blocks", "64", model=tiny_models["llama"])
    (alice,) = users(k, "alice")
    with k.client() as root:
        assert root.user_set("alice", share=3)["share"] == 3.0
        assert {u["user"]: u["share"] for u in root.user_list()} == {"root": 1.0, "alice": 3.0}
        assert errno_of(alice.user_set, "alice", share=100) == "EPERM"
        assert errno_of(root.user_set, "nobody", share=2) == "ENOENT"
        assert errno_of(root.user_set, "alice", share=0) == "EINVAL"
        pid = alice.spawn(prompt_ids=prompt_of(5), max_tokens=40, ignore_eos=True)
        me = alice.shares()
        assert [(r["user"], r["share"], r["procs"], r["fraction"]) for r in me] == [("alice", 3.0, 1, 1.0)]
        assert {r["user"] for r in root.shares(all=True)} == {"alice"}
        alice.wait(pid)
        assert alice.shares()[0]["tokens_served"] >= 40
    saved = json.loads((k.state / "users.json").read_text())["users"]
    assert saved["alice"]["share"] == 3.0


def test_ps_reports_blocks_shared_by_fork(start_kernel, tiny_models):
    k = start_kernel(*ARGS, "--kv-blocks", "64", model=tiny_models["llama"])
    with k.client() as c:
        pid = c.spawn(prompt_ids=prompt_of(13), max_tokens=1, interactive=True)
        list(c.read(pid))
        kid = c.fork(pid)[0]
        rows = {r["pid"]: r for r in c.ps()}
        assert rows[pid]["kv_shared"] == rows[kid]["kv_shared"] == 3      # 3 full blocks, 1 copied
        assert rows[pid]["wait"] == "input" and rows[pid]["state"] == "BLOCKED"
        for p in (pid, kid):
            c.kill(p)
            c.wait(p)


@pytest.mark.parametrize("mode", ["fair", "unfair"])
def test_the_fair_share_flag_changes_only_the_order(start_kernel, tiny_models, mode):
    flags = () if mode == "fair" else ("--no-fair-share",)
    k = start_kernel(*ARGS, "--kv-blocks", "64", "--max-num-seqs", "2", *flags, model=tiny_models["llama"])
    alice, bob = users(k, "alice", "bob")
    first = [alice.spawn(prompt_ids=prompt_of(4, offset=i), max_tokens=30, ignore_eos=True) for i in range(4)]
    late = bob.spawn(prompt_ids=prompt_of(4, offset=9), max_tokens=30, ignore_eos=True)
    done = bob.wait(late)
    left = [alice.pinfo(p)["tokens_out"] for p in first]
    if mode == "fair":                      # bob got a slot at once: two of alice's waited
        assert sorted(left)[:2] != [30, 30]
    else:                                   # by arrival: alice's first two ran to the end first
        assert sorted(left)[-2:] == [30, 30]
    assert len(done["token_ids"]) == 30
    for p in first:
        alice.wait(p)
