"""Users sharing one scheduler: weighted fair queueing within a priority level, aging that a
flood cannot exploit, preemption by shares, and per-user KV quotas that count a shared block
once. No model: results are hand-made (see ``sched_factories``)."""
from __future__ import annotations

from llmos.drivers.batch import SamplingParams
from llmos.kernel.proc import ProcState
from llmos.kernel.scheduler import Scheduler
from llmos.kernel.tenancy import Shares
from sched_factories import (chunk_of, check_scheduler_invariants, make_config, make_proc, make_scheduler,
                             run_step, run_until_done)

ALICE, BOB = 1001, 1002


def spawn(sched, pid, num_tokens=4, **fields):
    return sched.add(make_proc(pid, num_tokens, **fields))


def test_a_second_user_is_served_at_once_beside_a_full_batch_of_the_first():
    sched = make_scheduler(max_num_seqs=4)
    for pid in range(1, 9):
        spawn(sched, pid, uid=ALICE)
    run_step(sched)
    spawn(sched, 99, uid=BOB)                      # arrives last
    plan, _ = run_step(sched)
    assert chunk_of(plan, 99) is not None and len(plan.chunks) == 4


def test_without_fair_share_the_second_user_waits_for_earlier_arrivals():
    sched = make_scheduler(max_num_seqs=4)
    sched.shares.enabled = False
    for pid in range(1, 9):
        spawn(sched, pid, uid=ALICE, max_tokens=50)
    run_step(sched)
    spawn(sched, 99, uid=BOB)
    for _ in range(10):
        plan, _ = run_step(sched)
        assert chunk_of(plan, 99) is None


def test_tokens_are_served_in_proportion_to_the_users_shares():
    sched = make_scheduler(max_num_seqs=4, num_blocks=64, max_model_len=256)
    sched.shares.set_weight(ALICE, 3)
    for pid in range(1, 9):
        spawn(sched, pid, uid=ALICE, max_tokens=200)
        spawn(sched, 100 + pid, uid=BOB, max_tokens=200)
    run_step(sched)                                 # prefill
    served = dict(sched.shares.served)
    for _ in range(60):
        run_step(sched)
    alice = sched.shares.served[ALICE] - served[ALICE]
    bob = sched.shares.served[BOB] - served[BOB]
    assert alice + bob == 60 * 4
    assert 2.5 <= alice / bob <= 3.5


def test_an_idle_user_earns_no_credit_for_a_later_burst():
    sched = make_scheduler(max_num_seqs=2, num_blocks=64, max_model_len=256)
    spawn(sched, 1, uid=BOB, max_tokens=2)
    run_until_done(sched)                           # bob was served a little, long ago
    for pid in range(10, 14):
        spawn(sched, pid, uid=ALICE, max_tokens=200)
    for _ in range(100):                            # alice alone, far ahead of bob in tokens
        run_step(sched)
    for pid in range(20, 24):
        spawn(sched, pid, uid=BOB, max_tokens=200)
    plans = [run_step(sched)[0] for _ in range(20)]
    alice_chunks = sum(1 for p in plans for c in p.chunks if c.pid < 20)
    assert 10 <= alice_chunks <= 30                 # shared from now on, not all bob's for 100 steps


def test_a_flood_of_waiting_processes_does_not_age_past_a_newcomer_of_the_same_nice():
    sched = make_scheduler(max_num_seqs=2, aging_steps=2, num_blocks=64, max_model_len=256)
    for pid in range(1, 41):
        spawn(sched, pid, uid=ALICE, max_tokens=200)
    for _ in range(50):                             # most of alice's processes wait 50 steps
        run_step(sched)
    assert all(p.age == 0 for p in sched.procs.values())
    spawn(sched, 99, uid=BOB)
    plan, _ = run_step(sched)
    assert chunk_of(plan, 99) is not None


def test_a_user_over_its_share_of_the_pool_is_preempted_for_another_of_equal_priority():
    sched = make_scheduler()                        # 16 blocks of 4 tokens
    for pid in range(1, 5):
        spawn(sched, pid, 14, uid=ALICE)            # 4 blocks each: the pool is full
    run_step(sched)
    assert sched.block_manager.num_free_blocks == 0
    bob = spawn(sched, 9, 14, uid=BOB)
    plan, _ = run_step(sched)
    assert [pid for pid, _ in plan.preempted] == [4]      # alice's latest arrival
    assert chunk_of(plan, 9) is not None and bob.block_ids
    check_scheduler_invariants(sched, plan)


def test_users_holding_equal_shares_do_not_deadlock_when_both_grow():
    sched = make_scheduler()
    spawn(sched, 1, 16, uid=ALICE, max_tokens=30)   # full blocks: each next token needs a new one
    spawn(sched, 2, 16, uid=BOB, max_tokens=30)
    spawn(sched, 3, 16, uid=ALICE, max_tokens=30)
    spawn(sched, 4, 16, uid=BOB, max_tokens=30)
    run_until_done(sched)
    assert all(p.finish_reason == "length" for p in sched.procs.values())


def test_a_forked_user_counts_its_shared_blocks_once_against_its_quota():
    sched = make_scheduler()
    sched.set_kv_quota(ALICE, 4)
    parent = spawn(sched, 1, 9, uid=ALICE)
    run_step(sched)                                 # 10 tokens: 2 full blocks + a partial one
    assert sched.block_manager.kv_blocks_used_by(ALICE) == 3
    sched.fork(1, make_proc(2, 0, uid=ALICE, sampling=SamplingParams(seed=1)))
    assert sched.block_manager.kv_blocks_used_by(ALICE) == 4       # the 2 full blocks count once
    third = sched.fork(1, make_proc(3, 0, uid=ALICE, sampling=SamplingParams(seed=2)))
    assert sched.block_manager.kv_blocks_used_by(ALICE) == 4       # no room: it recomputes its tail
    assert third.num_computed_tokens == 8 and sched.pending_copies == [(parent.block_ids[2], sched.get(2).block_ids[2])]
    check_scheduler_invariants(sched)


def test_growth_past_the_quota_preempts_the_users_own_least_important_process():
    sched = make_scheduler()
    sched.set_kv_quota(ALICE, 4)
    first = spawn(sched, 1, 7, uid=ALICE, max_tokens=6)     # 2 blocks each: the quota is full
    second = spawn(sched, 2, 7, uid=ALICE, nice=5, max_tokens=6)
    other = spawn(sched, 3, 7, uid=BOB, max_tokens=6)
    run_step(sched)
    run_step(sched)
    assert sched.block_manager.kv_blocks_used_by(ALICE) == 4
    plan, _ = run_step(sched)                               # first grows into a 3rd block
    assert [pid for pid, _ in plan.preempted] == [2]
    assert other.num_preemptions == 0
    run_until_done(sched)
    assert first.finish_reason == second.finish_reason == "length"
    assert max(sched.shares.usage.values()) == 0


def test_the_quota_is_one_total_across_pools():
    shares = Shares()
    shares.kv_quotas[ALICE] = 4
    table: dict = {}
    a, b = (Scheduler(make_config(), table=table, shares=shares) for _ in range(2))
    a.add(make_proc(1, 8, uid=ALICE, max_tokens=20))        # 2 blocks on pool a...
    run_step(a)
    b.add(make_proc(2, 8, uid=ALICE, max_tokens=20))        # ...and 2 on pool b
    run_step(b)
    assert shares.usage[ALICE] == 4
    plan, _ = run_step(a)                                   # a's process needs a 3rd block
    assert chunk_of(plan, 1) is None and plan.preempted == []     # it cannot take b's: it waits
    assert table[1].state is ProcState.READY
