"""The scheduler, driven by hand-made results (the fake driver always samples token 7)."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmos.drivers.batch import SamplingParams
from llmos.kernel.proc import ProcState
from llmos.kernel.scheduler import Event, EventKind, Scheduler
from sched_factories import (TOKEN, check_scheduler_invariants, chunk_of, make_config, make_proc,
                             make_scheduler, run_step, run_until_done, unique_tokens)


def spawn(sched, pid, num_tokens=6, **fields):
    return sched.add(make_proc(pid, num_tokens, **fields))


# ----- configuration -----
@pytest.mark.parametrize("bad", [dict(preempt_mode="later"), dict(max_model_len=65),
                                 dict(max_num_seqs=0), dict(max_num_batched_tokens=0),
                                 dict(aging_steps=0), dict(num_host_blocks=-1)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        make_config(**bad)


def test_config_keeps_eos_ids_as_a_frozenset():
    assert make_config(eos_token_ids=[2, 3]).eos_token_ids == frozenset({2, 3})


# ----- batching -----
def test_prefill_then_one_decode_token_per_step():
    sched = make_scheduler()
    proc = spawn(sched, 1, 6)
    plan, events = run_step(sched)
    [chunk] = plan.chunks
    assert (chunk.start_pos, chunk.num_tokens, chunk.sample) == (0, 6, True)
    assert events == [Event(EventKind.TOKEN, 1, token_id=TOKEN)] and proc.state is ProcState.RUNNING
    plan, _ = run_step(sched)
    assert plan.chunks[0].token_ids == [TOKEN] and plan.chunks[0].start_pos == 6
    assert proc.token_ids[-2:] == [TOKEN, TOKEN] and proc.num_computed_tokens == 7


def test_chunked_prefill_respects_the_token_budget_and_samples_only_at_the_end():
    sched = make_scheduler(max_num_batched_tokens=8)
    proc = spawn(sched, 1, 20)
    chunks = [run_step(sched)[0].chunks[0] for _ in range(3)]
    assert [(c.start_pos, c.num_tokens, c.sample) for c in chunks] == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert proc.num_output_tokens == 1


def test_budget_goes_to_processes_in_order_and_the_last_one_gets_a_partial_chunk():
    sched = make_scheduler(max_num_batched_tokens=24)
    spawn(sched, 1, 20)
    spawn(sched, 2, 20)
    plan, _ = run_step(sched)
    assert [(c.pid, c.num_tokens, c.sample) for c in plan.chunks] == [(1, 20, True), (2, 4, False)]
    assert plan.num_tokens == 24


def test_max_num_seqs_limits_the_batch():
    sched = make_scheduler(max_num_seqs=2)
    third = [spawn(sched, pid, 4) for pid in (1, 2, 3)][2]
    plan, _ = run_step(sched)
    assert [c.pid for c in plan.chunks] == [1, 2]
    assert third.state is ProcState.READY and third.block_ids == []


def test_repetition_penalty_sends_the_history_and_otherwise_not():
    sched = make_scheduler()
    spawn(sched, 1, 5, sampling=SamplingParams(repetition_penalty=1.2))
    plain = spawn(sched, 2, 5)
    plan, _ = run_step(sched)
    assert chunk_of(plan, 1).history == sched.get(1).token_ids[:5]
    assert chunk_of(plan, plain.pid).history is None


# ----- prefix sharing -----
def test_second_process_with_a_shared_prefix_starts_after_the_cached_tokens():
    sched = make_scheduler()
    prompt = list(range(500, 510))
    first = sched.add(make_proc(1, token_ids=prompt))
    run_step(sched)
    second = sched.add(make_proc(2, token_ids=prompt[:8] + [1, 2, 3]))
    plan, _ = run_step(sched)
    chunk = chunk_of(plan, 2)
    assert chunk.start_pos == 8 and chunk.token_ids == [1, 2, 3]
    assert chunk.block_ids[:2] == first.block_ids[:2]
    assert second.num_cached_tokens == 8
    check_scheduler_invariants(sched, plan)


def test_identical_prompt_still_computes_its_last_block():
    sched = make_scheduler()
    prompt = list(range(500, 508))
    sched.add(make_proc(1, token_ids=prompt))
    run_step(sched)
    twin = sched.add(make_proc(2, token_ids=prompt))
    plan, _ = run_step(sched)
    assert chunk_of(plan, 2).start_pos == 4 and chunk_of(plan, 2).sample
    assert twin.num_cached_tokens == 4


# ----- priority and preemption -----
def fill_pool(sched, nices, num_tokens=14):
    """One process per nice, each holding 4 blocks after its prefill (16 blocks in all)."""
    procs = [spawn(sched, 1 + i, num_tokens, nice=nice) for i, nice in enumerate(nices)]
    run_step(sched)
    assert sched.block_manager.num_free_blocks == 0
    return procs


def test_important_arrival_into_a_saturated_load_runs_first_and_takes_the_budget():
    sched = make_scheduler()
    fill_pool(sched, [10, 10, 10, 10])
    sched.config.max_num_batched_tokens = 16        # saturated: the budget is now the bottleneck too
    urgent = spawn(sched, 9, 30, nice=-10)
    plan, _ = run_step(sched)
    assert plan.chunks[0].pid == 9 and plan.chunks[0].num_tokens == 16
    assert len(plan.chunks) == 1
    assert [pid for pid, _ in plan.preempted] == [4]           # latest arrival of the least important
    assert urgent.num_computed_tokens == 16
    check_scheduler_invariants(sched, plan)


def test_preemption_takes_the_least_important_first():
    sched = make_scheduler(max_num_batched_tokens=64)
    fill_pool(sched, [0, 10, 5, -5])
    spawn(sched, 9, 14, nice=-8)
    plan, _ = run_step(sched)
    assert [pid for pid, _ in plan.preempted] == [2]
    assert sched.get(2).num_preemptions == 1
    assert chunk_of(plan, 9) is not None


def test_stopped_processes_lose_their_blocks_first_whatever_their_priority():
    sched = make_scheduler()
    fill_pool(sched, [-15, 10, 10, 10])
    sched.stop(1)
    spawn(sched, 9, 14, nice=-10)
    plan, _ = run_step(sched)
    assert [pid for pid, _ in plan.preempted] == [1]
    assert sched.get(1).state is ProcState.STOPPED
    sched.cont(1)
    assert sched.get(1).is_runnable


def test_more_important_processes_are_never_preempted_and_the_newcomer_waits():
    sched = make_scheduler()
    fill_pool(sched, [-10, -10, -10, -10])
    late = spawn(sched, 9, 14, nice=0)
    for _ in range(2):                              # the pool's processes still fit their blocks
        plan, _ = run_step(sched)
        assert plan.preempted == [] and chunk_of(plan, 9) is None
    assert late.state is ProcState.READY and late.block_ids == []


def test_a_waiting_process_gives_back_its_prefix_cache_hits():
    sched = make_scheduler(num_blocks=7, max_model_len=28)
    prompt = list(range(500, 512))
    sched.add(make_proc(1, token_ids=prompt + [1, 1], nice=-10))
    run_step(sched)
    for pid in (2, 3, 4):                           # these share the first's 3 full blocks
        sched.add(make_proc(pid, token_ids=prompt + [pid] * 2, nice=-10))
    run_step(sched)
    assert sched.block_manager.num_free_blocks == 0
    refs = [b.ref_count for b in sched.block_manager.blocks]
    late = sched.add(make_proc(9, token_ids=prompt + [9] * 10, nice=0))
    plan, _ = run_step(sched)
    assert chunk_of(plan, 9) is None and plan.preempted == []
    assert late.block_ids == [] and late.num_computed_tokens == 0 and late.num_cached_tokens == 0
    assert [b.ref_count for b in sched.block_manager.blocks] == refs


def test_equal_priority_newcomer_waits_for_earlier_arrivals():
    sched = make_scheduler()
    fill_pool(sched, [0, 0, 0, 0])
    spawn(sched, 9, 14, nice=0)
    plan, _ = run_step(sched)
    assert plan.preempted == [] and chunk_of(plan, 9) is None


def test_growing_processes_preempt_later_arrivals_instead_of_deadlocking():
    sched = make_scheduler()
    fill_pool(sched, [0, 0, 0, 0], num_tokens=16)              # full blocks: next token needs a block
    plan, _ = run_step(sched)
    assert [pid for pid, _ in plan.preempted] == [4]
    assert {c.pid for c in plan.chunks} == {1, 2, 3}
    run_until_done(sched)


def test_a_request_that_cannot_fit_preempts_nobody():
    sched = make_scheduler()
    fill_pool(sched, [-10, -10, -10, 10])
    spawn(sched, 9, 30, nice=-5)                                # needs 8 blocks, only 4 takeable
    plan, _ = run_step(sched)
    assert plan.preempted == []


def test_aging_lets_a_starved_low_priority_process_run():
    sched = make_scheduler(max_num_seqs=1, aging_steps=2)
    low = spawn(sched, 1, 4, nice=19)
    pid = 100
    for step in range(200):
        pid += 1
        spawn(sched, pid, 4, nice=-20, max_tokens=2)            # a fresh urgent process every step
        plan, _ = run_step(sched)
        if chunk_of(plan, 1):
            break
    else:
        pytest.fail("the nice 19 process starved")
    assert step >= 2 * (19 + 20)          # it waited its turn: one nice level per aging_steps
    assert low.age == 0


def test_set_nice_reorders_the_queue():
    sched = make_scheduler(max_num_seqs=1)
    spawn(sched, 1, 4)
    spawn(sched, 2, 4)
    sched.set_nice(2, -5)
    plan, _ = run_step(sched)
    assert plan.chunks[0].pid == 2
    with pytest.raises(ValueError, match="nice"):
        sched.set_nice(2, 20)


# ----- swap and recompute -----
def test_swap_preemption_lists_copies_and_swaps_back_in_where_it_left_off():
    sched = make_scheduler(preempt_mode="swap")
    victim = fill_pool(sched, [0, 0, 0, 10])[3]
    table = list(victim.block_ids)
    urgent = spawn(sched, 9, 14, nice=-10, max_tokens=1)
    plan, events = run_step(sched)
    assert plan.preempted == [(4, "swap")] and Event(EventKind.PREEMPTED, 4, reason="swap") in events
    assert [dev for dev, _ in plan.swap_out] == table
    assert victim.state is ProcState.SWAPPED and len(victim.host_block_ids) == 4
    assert victim.num_computed_tokens == 14 and victim.num_swaps == 1
    assert urgent.state is ProcState.ZOMBIE                     # done in one step: blocks free
    hosts = list(victim.host_block_ids)
    plan, events = run_step(sched)
    assert plan.swap_in and {host for host, _ in plan.swap_in} <= set(hosts)
    assert {dev for _, dev in plan.swap_in} <= set(victim.block_ids) and len(victim.block_ids) == 4
    assert chunk_of(plan, 4).start_pos == 14
    assert Event(EventKind.RESUMED, 4) in events
    check_scheduler_invariants(sched, plan)


def test_recompute_preemption_resets_computed_tokens_and_the_prefix_cache_helps():
    sched = make_scheduler(preempt_mode="recompute")
    victim = fill_pool(sched, [0, 0, 0, 10])[3]
    spawn(sched, 9, 6, nice=-10, max_tokens=1)      # takes two of the victim's four blocks
    plan, _ = run_step(sched)
    assert plan.preempted == [(4, "recompute")] and plan.swap_out == []
    assert victim.num_computed_tokens == 0 and victim.block_ids == []
    assert victim.state is ProcState.READY and victim.num_recomputes == 1
    plan, _ = run_step(sched)
    chunk = chunk_of(plan, 4)
    assert chunk.start_pos == victim.num_cached_tokens == 8      # its head blocks were still cached


@pytest.mark.parametrize("computed_tokens, host_blocks, expected", [
    (6, 16, "recompute"), (14, 16, "swap"), (14, 0, "recompute")])
def test_auto_mode_recomputes_short_or_unswappable_victims_and_swaps_long_ones(computed_tokens, host_blocks, expected):
    sched = make_scheduler(recompute_max_tokens=8, num_host_blocks=host_blocks)
    victim = spawn(sched, 1, computed_tokens, nice=10)
    spawn(sched, 2, 64 - 16 - 1, nice=0)                          # fills the rest of the pool
    run_step(sched)
    spawn(sched, 9, 14, nice=-10)
    plan, _ = run_step(sched)
    assert (victim.pid, expected) in plan.preempted


def test_swap_mode_falls_back_to_recompute_when_host_space_is_short():
    sched = make_scheduler(preempt_mode="swap", num_host_blocks=2)
    fill_pool(sched, [0, 0, 0, 10])
    spawn(sched, 9, 14, nice=-10)
    plan, _ = run_step(sched)
    assert plan.preempted == [(4, "recompute")]


# ----- finishing -----
def test_stop_token_finishes_with_stop_and_frees_the_blocks():
    sched = make_scheduler()
    proc = spawn(sched, 1, 6, stop_token_ids={TOKEN})
    _, events = run_step(sched)
    assert events[-1] == Event(EventKind.FINISHED, 1, reason="stop")
    assert proc.state is ProcState.ZOMBIE and proc.finish_reason == "stop" and proc.block_ids == []
    assert sched.block_manager.num_free_blocks == 16


def test_eos_finishes_unless_ignore_eos():
    sched = make_scheduler(eos_token_ids={TOKEN})
    plain = spawn(sched, 1, 6)
    stubborn = spawn(sched, 2, 6, ignore_eos=True, max_tokens=3)
    run_step(sched)
    assert plain.finish_reason == "stop" and stubborn.is_alive
    run_until_done(sched)
    assert stubborn.finish_reason == "length" and stubborn.num_output_tokens == 3


def test_stop_token_ids_apply_even_with_ignore_eos():
    sched = make_scheduler(eos_token_ids={TOKEN})
    proc = spawn(sched, 1, 6, ignore_eos=True, stop_token_ids={TOKEN})
    run_step(sched)
    assert proc.finish_reason == "stop"


def test_max_tokens_finishes_with_length():
    sched = make_scheduler()
    proc = spawn(sched, 1, 6, max_tokens=4)
    assert run_until_done(sched) == 4
    assert proc.finish_reason == "length" and proc.num_output_tokens == 4


def test_reaching_max_model_len_finishes_with_length():
    sched = make_scheduler()
    proc = spawn(sched, 1, 60)
    run_until_done(sched)
    assert proc.finish_reason == "length" and proc.num_tokens == 64


def test_prompts_that_reach_max_model_len_are_rejected():
    with pytest.raises(ValueError):
        spawn(make_scheduler(), 1, 64)


# ----- interactive turns -----
def test_finished_interactive_process_blocks_with_its_kv_and_continues_on_input():
    sched = make_scheduler()
    proc = spawn(sched, 1, 6, max_tokens=2, interactive=True)
    run_until_done(sched)
    assert proc.state is ProcState.BLOCKED and proc.finish_reason == "length"
    table, computed = list(proc.block_ids), proc.num_computed_tokens
    assert computed == 7 and table
    sched.append_input(1, [1, 2, 3])
    assert proc.state is ProcState.READY and proc.num_computed_tokens == computed
    assert proc.num_output_tokens == 0 and proc.finish_reason is None
    plan, _ = run_step(sched)
    chunk = chunk_of(plan, 1)
    assert chunk.start_pos == 7 and chunk.token_ids == [TOKEN, 1, 2, 3]
    assert chunk.block_ids[:len(table)] == table
    run_until_done(sched)
    assert proc.state is ProcState.BLOCKED and proc.num_output_tokens == 2


def test_append_input_rejects_busy_processes_and_bad_input():
    sched = make_scheduler()
    proc = spawn(sched, 1, 6, max_tokens=1, interactive=True)
    with pytest.raises(ValueError, match="awaiting input"):
        sched.append_input(1, [1])
    run_step(sched)
    with pytest.raises(ValueError):
        sched.append_input(1, [])
    with pytest.raises(ValueError, match="max_model_len"):
        sched.append_input(1, list(range(60)))
    assert proc.state is ProcState.BLOCKED


def test_finish_ends_the_running_turn_and_is_a_no_op_once_it_has_ended():
    sched = make_scheduler()
    chat = spawn(sched, 1, 6, interactive=True)
    batch = spawn(sched, 2, 6)
    run_step(sched)
    assert sched.finish(1, "stop") and sched.finish(2, "stop")
    assert chat.state is ProcState.BLOCKED and chat.block_ids
    assert batch.state is ProcState.ZOMBIE and batch.finish_reason == "stop"
    assert not sched.finish(1, "stop") and not sched.finish(2, "stop")
    assert chat.state is ProcState.BLOCKED and batch.state is ProcState.ZOMBIE


def test_swapped_out_blocked_process_swaps_in_after_input():
    sched = make_scheduler(preempt_mode="swap")
    chat = spawn(sched, 1, 14, max_tokens=1, interactive=True, nice=-20)
    run_step(sched)
    assert chat.state is ProcState.BLOCKED
    spawn(sched, 2, 50)
    plan, _ = run_step(sched)
    assert plan.preempted == [(1, "swap")] and chat.state is ProcState.BLOCKED
    sched.kill(2)
    sched.append_input(1, [5])
    assert chat.state is ProcState.SWAPPED
    plan, _ = run_step(sched)
    assert plan.swap_in and chunk_of(plan, 1).start_pos == 14


# ----- controls -----
def test_kill_frees_blocks_at_once_and_release_reaps():
    sched = make_scheduler()
    proc = spawn(sched, 1, 10)
    run_step(sched)
    sched.kill(1)
    assert proc.state is ProcState.ZOMBIE and proc.finish_reason == "killed"
    assert sched.block_manager.num_free_blocks == 16
    sched.kill(1)                                   # killing a zombie does nothing
    assert sched.release(1) is proc and 1 not in sched.procs


def test_release_of_a_live_process_is_refused():
    sched = make_scheduler()
    spawn(sched, 1)
    with pytest.raises(ValueError, match="still"):
        sched.release(1)


@pytest.mark.parametrize("call", [
    lambda s: s.get(42), lambda s: s.kill(42), lambda s: s.stop(42), lambda s: s.cont(42),
    lambda s: s.set_nice(42, 0), lambda s: s.finish(42, "stop"), lambda s: s.append_input(42, [1]),
    lambda s: s.release(42), lambda s: s.fork(42, make_proc(43, 0))])
def test_unknown_pids_raise_key_error(call):
    with pytest.raises(KeyError, match="42"):
        call(make_scheduler())


@pytest.mark.parametrize("call", [
    lambda s: s.stop(1), lambda s: s.cont(1), lambda s: s.set_nice(1, 0), lambda s: s.fork(1, make_proc(2, 0)),
    lambda s: s.append_input(1, [1])])
def test_controls_on_a_zombie_raise_value_error(call):
    sched = make_scheduler()
    spawn(sched, 1)
    sched.kill(1)
    with pytest.raises(ValueError, match="exited"):
        call(sched)


def test_add_refuses_a_duplicate_pid():
    sched = make_scheduler()
    spawn(sched, 1)
    with pytest.raises(ValueError, match="exists"):
        spawn(sched, 1)


def test_stopped_process_is_not_scheduled_until_cont():
    sched = make_scheduler()
    proc = spawn(sched, 1, 6)
    run_step(sched)
    sched.stop(1)
    plan, _ = run_step(sched)
    assert plan.chunks == [] and proc.state is ProcState.STOPPED and proc.block_ids
    sched.cont(1)
    plan, _ = run_step(sched)
    assert chunk_of(plan, 1).start_pos == 6


# ----- fork -----
def test_fork_shares_full_blocks_and_the_next_plan_copies_the_partial_one():
    sched = make_scheduler()
    parent = spawn(sched, 1, 9)
    run_step(sched)                                 # 9 computed: 2 full blocks + 1 token
    child = sched.fork(1, make_proc(2, 0, sampling=SamplingParams(seed=1)))
    assert child.token_ids == parent.token_ids and child.ppid == 1
    assert child.block_ids[:2] == parent.block_ids[:2] and child.block_ids[2] != parent.block_ids[2]
    plan, events = run_step(sched)
    assert plan.copies == [(parent.block_ids[2], child.block_ids[2])]
    assert chunk_of(plan, 2).start_pos == 9 and chunk_of(plan, 2).block_ids == child.block_ids
    assert {e.pid for e in events if e.kind is EventKind.TOKEN} == {1, 2}
    check_scheduler_invariants(sched, plan)
    assert run_step(sched)[0].copies == []


def test_fork_of_a_parent_with_a_full_last_block_copies_nothing():
    sched = make_scheduler(max_num_batched_tokens=12)
    parent = spawn(sched, 1, 20)
    run_step(sched)                                 # a 12-token chunk: three full blocks
    child = sched.fork(1, make_proc(2, 0))
    assert child.block_ids == parent.block_ids and child.num_computed_tokens == 12
    plan, _ = run_step(sched)
    assert plan.copies == []
    assert chunk_of(plan, 1).start_pos == chunk_of(plan, 2).start_pos == 12


def test_fork_of_a_blocked_parent_gives_a_blocked_child():
    sched = make_scheduler()
    spawn(sched, 1, 6, max_tokens=1, interactive=True)
    run_step(sched)
    child = sched.fork(1, make_proc(2, 0, interactive=True))
    assert child.state is ProcState.BLOCKED
    sched.append_input(2, [4])
    plan, _ = run_step(sched)
    assert chunk_of(plan, 2).start_pos == 6


# ----- quotas and meminfo -----
def test_a_process_at_its_users_kv_quota_waits_until_the_quota_allows():
    sched = make_scheduler()
    sched.set_kv_quota(5, 3)
    spawn(sched, 1, 6, uid=5)                       # 2 blocks
    second = spawn(sched, 2, 6, uid=5)              # 2 more: over quota
    other = spawn(sched, 3, 6, uid=6)
    plan, _ = run_step(sched)
    assert {c.pid for c in plan.chunks} == {1, 3} and second.block_ids == []
    assert sched.block_manager.kv_blocks_used_by(5) == 2
    sched.set_kv_quota(5, None)
    plan, _ = run_step(sched)
    assert chunk_of(plan, 2) is not None and other.is_alive


def test_a_process_that_outgrows_its_users_quota_exits_with_quota():
    sched = make_scheduler()
    sched.set_kv_quota(5, 2)
    proc = spawn(sched, 1, 7, uid=5)
    run_until_done(sched)
    assert proc.finish_reason == "quota" and proc.num_tokens == 9


def test_set_kv_quota_rejects_non_positive_limits():
    with pytest.raises(ValueError):
        make_scheduler().set_kv_quota(1, 0)


def test_meminfo_adds_process_counts_by_state():
    sched = make_scheduler()
    spawn(sched, 1, 16)
    spawn(sched, 2, 16)
    run_step(sched)
    sched.stop(2)
    info = sched.meminfo()
    assert info["blocks_used"] == 8 and info["utilization"] == pytest.approx(1.0)
    assert info["procs_by_state"]["running"] == 1 and info["procs_by_state"]["stopped"] == 1


# ----- randomized -----
OPS = st.lists(st.tuples(st.sampled_from(["spawn", "spawn", "step", "step", "step", "step", "fork",
                                          "stop", "cont", "kill", "nice", "input", "finish"]),
                         st.integers(0, 1000)), min_size=10, max_size=80)
POOL_BLOCKS, MAX_LEN = 10, 40


def run_random_workload(ops, mode, host):
    """Apply random controls and steps to a small pool, checking the invariants after every
    operation; then, with no new work, step until every process has exited."""
    sched = make_scheduler(num_blocks=POOL_BLOCKS, num_host_blocks=host, max_num_batched_tokens=16,
                           max_num_seqs=4, max_model_len=MAX_LEN, preempt_mode=mode,
                           recompute_max_tokens=6, aging_steps=4, eos_token_ids={3})
    shared = list(range(900, 940))
    next_pid = 1

    def live():
        return sorted(pid for pid, p in sched.procs.items() if p.is_alive)

    for op, arg in ops:
        pids = live()
        target = pids[arg % len(pids)] if pids else None
        if op == "spawn" and len(pids) < 10:
            n = 1 + arg % 30
            tokens = shared[:n] if arg % 2 else [arg] * n
            sched.add(make_proc(next_pid, token_ids=tokens, nice=arg % 40 - 20, max_tokens=1 + arg % 20,
                                interactive=arg % 5 == 0, ignore_eos=arg % 3 == 0))
            next_pid += 1
        elif op == "step":
            plan, _ = run_step(sched, lambda pid: (pid + arg) % 6)
            check_scheduler_invariants(sched, plan)
        elif target is None:
            continue
        elif op == "fork" and len(pids) < 10:
            sched.fork(target, make_proc(next_pid, 0, max_tokens=1 + arg % 10))
            next_pid += 1
        elif op == "stop":
            sched.stop(target)
        elif op == "cont":
            sched.cont(target)
        elif op == "kill":
            sched.kill(target)
        elif op == "nice":
            sched.set_nice(target, arg % 40 - 20)
        elif op == "finish":
            sched.finish(target, "stop")
        elif op == "input" and sched.get(target).state is ProcState.BLOCKED:
            if sched.get(target).num_tokens + 2 < MAX_LEN:
                sched.append_input(target, [arg, arg + 1])
        check_scheduler_invariants(sched)

    for pid in live():                              # wake everything, end conversations
        sched.cont(pid)
        sched.get(pid).interactive = False
        if sched.get(pid).state is ProcState.BLOCKED:
            sched.kill(pid)
    for _ in range(3000):
        if not live():
            break
        plan, _ = run_step(sched, lambda pid: 4)
        check_scheduler_invariants(sched, plan)
    assert not live(), "processes left unfinished"
    sched.schedule()                                # releases the last fork pins
    assert sched.block_manager.num_free_blocks == POOL_BLOCKS
    assert sched.block_manager.num_free_host_blocks == host
    return sched


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, mode=st.sampled_from(["auto", "swap", "recompute"]), host=st.sampled_from([0, 6, 40]))
def test_random_workloads_keep_the_invariants_and_all_finish(ops, mode, host):
    run_random_workload(ops, mode, host)


def test_a_step_holds_no_more_distinct_adapters_than_slots():
    sched = make_scheduler(max_adapters_per_step=2)
    for pid, adapter in enumerate(["a", "b", "c", None, "a"], start=1):
        sched.add(make_proc(pid, adapter=adapter))
    plan, _ = run_step(sched)
    assert {c.adapter for c in plan.chunks} - {None} == {"a", "b"}
    assert {c.pid for c in plan.chunks} == {1, 2, 4, 5}      # "c" waits: a third adapter would not fit
    seen = set()
    for _ in range(40):
        plan, _ = run_step(sched)
        assert len({c.adapter for c in plan.chunks} - {None}) <= 2
        seen |= {c.pid for c in plan.chunks}
    assert 3 in seen                                          # and it does run later


def test_prefix_cache_is_per_adapter():
    sched = make_scheduler(block_size=4)
    prompt = unique_tokens(13)
    sched.add(make_proc(1, token_ids=prompt))
    run_until_done(sched)
    sched.add(make_proc(2, token_ids=prompt, adapter="a"))
    sched.add(make_proc(3, token_ids=prompt))
    run_step(sched)
    assert sched.get(2).num_cached_tokens == 0 and sched.get(3).num_cached_tokens == 12


# ----- KV variants (rope frequencies chosen by length) -----
def test_a_sequence_whose_kv_variant_changes_recomputes_all_of_it_under_its_new_variant():
    """Past 10 tokens the model computes other KV (Phi-3's long rope factors): the token that
    makes the sequence 11 long drops its KV, and the next step recomputes all 11 positions — not
    from the blocks it cached under the other variant. Cached blocks serve their variant only."""
    sched = Scheduler(make_config(), kv_variant=lambda prompt_len, seq_len: int(seq_len > 10))
    prompt = unique_tokens(9)
    proc = spawn(sched, 1, token_ids=prompt)
    run_step(sched)                               # prefill 9, sample the 10th token
    assert proc.num_computed_tokens == 9 and proc.block_ids
    plan, _ = run_step(sched)                     # decode: the 11th token crosses
    assert proc.num_tokens == 11 and proc.num_computed_tokens == 0 and not proc.block_ids
    assert proc.num_recomputes == 1
    plan, _ = run_step(sched)
    [chunk] = plan.chunks
    assert (chunk.start_pos, chunk.num_tokens, chunk.seq_len, chunk.prompt_len) == (0, 11, 11, 9)
    other = spawn(sched, 2, token_ids=prompt + [TOKEN] * 8)      # long from the start: variant 1
    plan, _ = run_step(sched)
    assert chunk_of(plan, 2).start_pos == 8       # the recompute's blocks (same variant) are shared
    spawn(sched, 3, token_ids=prompt)             # short: the blocks of the first prefill serve it
    plan, _ = run_step(sched)
    assert chunk_of(plan, 3).start_pos == 8 and chunk_of(plan, 3).prompt_len == 9
