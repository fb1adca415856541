"""The cluster's pure parts without Ray: placement, the prefix index, global pids, merging
answers; and what a plain kernel says to the calls only a front serves."""
from __future__ import annotations

from conftest import errno_of
from llmos.cluster import merge
from llmos.cluster.pids import PidTable, translate
from llmos.cluster.placement import CHUNK, Candidate, Policy, PrefixIndex, choose, prompt_key

SYSTEM = "You are a helpful assistant. " * 4


def cands(*loads, resident=None):
    return [Candidate(k, load, True if resident is None else k in resident) for k, load in enumerate(loads)]


def test_a_spawn_goes_where_its_prefix_is_cached():
    index = PrefixIndex()
    index.insert(1, SYSTEM + "first user", "m")
    kernel, why = choose(cands(0, 3, 0), index, SYSTEM + "second user", "m", Policy())
    assert kernel == 1 and why["reason"] == "prefix" and why["prefix"] >= len(SYSTEM) - CHUNK


def test_the_prefix_index_is_per_model_and_forgets_a_restarted_kernel():
    index = PrefixIndex()
    index.insert(1, SYSTEM, "m")
    assert index.match(1, SYSTEM, "other") == 0
    index.forget(1)
    assert index.match(1, SYSTEM, "m") == 0


def test_the_prefix_index_is_bounded():
    index = PrefixIndex(capacity=10)
    for i in range(50):
        index.insert(0, f"{i:04d}" * 40, "m")
    assert len(index.kernels[0]) == 10


def test_a_new_prefix_goes_to_the_smallest_cache_then_the_least_loaded():
    index = PrefixIndex()
    assert choose(cands(5, 2, 9), index, "fresh", "m", Policy())[0] == 1
    index.insert(1, SYSTEM, "m")
    kernel, why = choose(cands(5, 2, 5), index, "something else entirely", "m", Policy())
    assert kernel == 0 and why["reason"] == "smallest cache"
    kernel, why = choose(cands(0, 4, 6, resident={2}), index, "fresh", "m", Policy())
    assert kernel == 2 and why["reason"] == "model resident"


def test_a_hot_prefix_cannot_overload_one_kernel():
    index = PrefixIndex()
    index.insert(0, SYSTEM, "m")
    kernel, why = choose(cands(20, 2), index, SYSTEM + "more", "m", Policy(balance_abs=8, balance_rel=1.5))
    assert kernel == 1 and why["reason"] == "balance"
    assert choose(cands(6, 2), index, SYSTEM + "more", "m", Policy(balance_abs=8))[0] == 0


def test_round_robin_and_least_loaded_policies_ignore_the_cache():
    index = PrefixIndex()
    index.insert(0, SYSTEM, "m")
    picks = [choose(cands(0, 0, 0), index, SYSTEM, "m", Policy("round-robin"), turn)[0] for turn in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]
    assert choose(cands(3, 1, 2), index, SYSTEM, "m", Policy("least-loaded"))[0] == 1


def test_prompt_keys_cover_text_messages_and_ids():
    assert prompt_key({"prompt": "abc"}) == "abc"
    assert prompt_key({"prompt_ids": [1, 2]}) == (1, 2)
    msgs = prompt_key({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})
    assert "s" in msgs and "u" in msgs and prompt_key({"prompt": 5}) == ""


def test_global_pids_survive_a_move_and_translate_results():
    pids = PidTable()
    g1, g2 = pids.add(0, 7, uid=1000), pids.add(1, 7, uid=1000)
    assert g1 != g2 and pids.get(g1).lpid == 7
    pids.move(g1, 2, 3)
    assert (pids.get(g1).kernel, pids.get(g1).lpid, pids.get(g1).version) == (2, 3, 1)
    assert pids.gpid_of(2, 3) == g1 and pids.gpid_of(0, 0) == 0
    rows = translate(pids, "ps", 2, [{"pid": 3, "ppid": 0, "state": "RUNNING"}], node="n1")
    assert rows == [{"pid": g1, "ppid": 0, "state": "RUNNING", "kernel": 2, "node": "n1"}]
    kids = translate(pids, "fork", 1, [8, 9])
    assert len(set(kids)) == 2 and g2 not in kids
    assert translate(pids, "wait", 1, {"pid": 7, "text": "x"})["pid"] == g2
    assert pids.get("1") is None and pids.get(True) is None
    pids.drop(g2)
    assert pids.get(g2) is None and pids.num_live(1000) == 1


def test_counters_are_summed_and_models_merged_by_name():
    summed = merge._sum([{"tokens": 2, "procs": {"RUNNING": 1}, "block_size": 16, "uptime_s": 5},
                         {"tokens": 3, "procs": {"RUNNING": 2, "ZOMBIE": 1}, "block_size": 16, "uptime_s": 9}])
    assert summed == {"tokens": 5, "procs": {"RUNNING": 3, "ZOMBIE": 1}, "block_size": 16, "uptime_s": 9}
    models = merge._models({0: [{"name": "m", "where": "host", "processes": 1}],
                            1: [{"name": "m", "where": "device", "processes": 2}]})
    assert models == [{"name": "m", "where": "device", "processes": 3, "kernels": [0, 1]}]


def test_a_plain_kernel_refuses_the_fronts_calls_and_shares_its_users(kernel, root):
    assert errno_of(root.cluster) == "ENOTSUP"
    assert errno_of(root.cluster_drain, kernel=1) == "ENOTSUP"
    token = root.user_add(name="bob")["token"]
    table = root.users_sync()
    assert set(table["users"]) == {"root", "bob"} and token not in str(table)    # hashes, never tokens
    assert all(len(h) == 64 for h in table["users"]["bob"]["token_hashes"])
    with kernel.client(token) as bob:
        assert errno_of(bob.users_sync) == "EPERM"
    assert errno_of(root.users_sync, table={"users": {}}) == "EINVAL"   # a table without root
    del table["users"]["bob"]
    assert root.users_sync(table=table) == {"users": 1}
    with kernel.client(token) as gone:
        assert errno_of(gone.whoami) == "EACCES"


def test_the_front_forgets_sessions_that_went_silent(tmp_path):
    from llmos.cluster.front import Forward, Front, FrontConfig
    from llmos.syscalls import abi
    front = Front(FrontConfig(state_dir=tmp_path, socket=f"ipc://{tmp_path}/s"))
    fwd = Forward(b"id", abi.Request(1, "nop", {}, "t", session="abc"), "nop")
    front.note_session(fwd, 2)
    front.forget_sessions(older_than=60)
    assert front.sessions == {"abc": {2}}
    front.forget_sessions(older_than=-1)
    assert front.sessions == {} and front.session_seen == {}
