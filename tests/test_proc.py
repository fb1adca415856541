"""The process control block."""
import pytest

from llmos.drivers.batch import SamplingParams
from llmos.kernel.proc import Process, ProcState


def test_states_are_the_six_upper_case_states():
    assert [s.name for s in ProcState] == ["READY", "RUNNING", "BLOCKED", "STOPPED", "SWAPPED", "ZOMBIE"]


def test_new_process_takes_prompt_length_and_turn_start_from_tokens():
    proc = Process(pid=3, token_ids=[1, 2, 3, 4])
    assert proc.state is ProcState.READY
    assert proc.num_prompt_tokens == proc.turn_start == proc.num_tokens == proc.tokens_in == 4
    assert proc.num_output_tokens == 0
    assert proc.num_computed_tokens == 0 and proc.block_ids == [] and proc.host_block_ids == []
    assert proc.io is None and proc.sampling == SamplingParams()


def test_num_output_tokens_counts_only_the_current_turn():
    proc = Process(pid=1, token_ids=[1, 2, 3])
    proc.token_ids += [7, 7]
    assert proc.num_output_tokens == 2 and proc.output_token_ids == [7, 7]
    proc.token_ids += [4, 5]
    proc.turn_start = proc.num_tokens
    assert proc.num_output_tokens == 0


def test_uncomputed_tokens_are_those_without_kv():
    proc = Process(pid=1, token_ids=[1, 2, 3, 4, 5])
    proc.num_computed_tokens = 3
    assert proc.num_uncomputed_tokens == 2


def test_is_alive_until_zombie_and_runnable_only_when_ready_running_or_swapped():
    proc = Process(pid=1, token_ids=[1])
    runnable = {ProcState.READY, ProcState.RUNNING, ProcState.SWAPPED}
    for state in ProcState:
        proc.state = state
        assert proc.is_alive == (state is not ProcState.ZOMBIE)
        assert proc.is_runnable == (state in runnable)


def test_stop_token_ids_become_a_frozenset():
    proc = Process(pid=1, token_ids=[1], stop_token_ids={5, 6})
    assert proc.stop_token_ids == frozenset({5, 6}) and isinstance(proc.stop_token_ids, frozenset)


@pytest.mark.parametrize("nice", [-21, 20])
def test_nice_out_of_range_is_rejected(nice):
    with pytest.raises(ValueError, match="nice"):
        Process(pid=1, token_ids=[1], nice=nice)


def test_max_tokens_below_one_is_rejected():
    with pytest.raises(ValueError, match="max_tokens"):
        Process(pid=1, token_ids=[1], max_tokens=0)


def test_processes_compare_by_identity():
    assert Process(pid=1, token_ids=[1]) != Process(pid=1, token_ids=[1])
