"""The KV block pool: allocation, ref counts, prefix cache, fork, swap, meminfo."""
import pytest

from llmos.kernel.block_manager import NO_HASH, BlockManager
from sched_factories import check_block_invariants, make_proc

BS = 4


def make_bm(num_blocks=8, num_host_blocks=8) -> BlockManager:
    return BlockManager(num_blocks, num_host_blocks, block_size=BS)


def computed(bm, proc, num_tokens=None):
    """Pretend the driver computed the KV of ``num_tokens`` (default: all but the last)."""
    n = proc.num_tokens - 1 if num_tokens is None else num_tokens
    bm.allocate(proc, n - proc.num_computed_tokens)
    proc.num_computed_tokens = n
    bm.cache_full_blocks(proc)
    return proc


# ----- allocation and ref counts -----
def test_allocate_extends_table_to_cover_computed_plus_new_tokens():
    bm, proc = make_bm(), make_proc(1, 10)
    assert bm.num_blocks_needed(proc, 9) == 3
    assert bm.allocate(proc, 9) == proc.block_ids and len(proc.block_ids) == 3
    proc.num_computed_tokens = 9
    assert bm.num_blocks_needed(proc, 3) == 0        # 12 tokens still fit 3 blocks
    assert bm.allocate(proc, 3) == []
    assert len(bm.allocate(proc, 4)) == 1
    assert all(bm.blocks[b].ref_count == 1 for b in proc.block_ids)
    check_block_invariants(bm, [proc])


def test_can_allocate_is_false_when_the_pool_is_short():
    bm, proc = make_bm(num_blocks=2), make_proc(1, 20)
    assert bm.can_allocate(proc, 8) and not bm.can_allocate(proc, 9)


def test_free_returns_every_block_and_keeps_hashes_for_the_cache():
    bm, proc = make_bm(), make_proc(1, 10)
    computed(bm, proc)
    hashed = [b for b in proc.block_ids if bm.blocks[b].hash != NO_HASH]
    assert len(hashed) == 2                        # 9 computed tokens: 2 full blocks
    bm.free(proc)
    assert proc.block_ids == [] and bm.num_free_blocks == 8
    assert all(bm.blocks[b].hash != NO_HASH for b in hashed)
    check_block_invariants(bm, [proc])


def test_freed_blocks_go_to_the_back_head_of_prefix_last():
    bm, proc = make_bm(num_blocks=4), make_proc(1, 10)
    computed(bm, proc)
    first, second, third = proc.block_ids
    bm.free(proc)
    assert list(bm.free_block_ids)[-3:] == [third, second, first]


def test_reusing_a_cached_block_forgets_its_hash():
    bm = make_bm(num_blocks=3)
    a = computed(bm, make_proc(1, 10))
    bm.free(a)
    b = make_proc(2, 12)
    bm.allocate(b, 12)
    assert bm.hash_to_block_id == {}
    assert all(bm.blocks[i].hash == NO_HASH for i in b.block_ids)


def test_ref_count_below_zero_fails_loudly():
    bm, proc = make_bm(), make_proc(1, 4)
    bm.allocate(proc, 4)
    bm.blocks[proc.block_ids[0]].ref_count = 0
    with pytest.raises(AssertionError):
        bm.free(proc)


# ----- prefix sharing -----
def test_match_prefix_reuses_cached_full_blocks_and_skips_their_compute():
    bm = make_bm()
    prompt = list(range(100, 110))
    a = computed(bm, make_proc(1, token_ids=prompt))
    b = make_proc(2, token_ids=prompt[:8] + [1, 2, 3])
    assert bm.match_prefix(b) == 8
    assert b.num_computed_tokens == 8 and b.block_ids == a.block_ids[:2]
    assert [bm.blocks[i].ref_count for i in b.block_ids] == [2, 2]
    check_block_invariants(bm, [a, b])


def test_match_prefix_never_takes_the_block_holding_the_last_token():
    bm = make_bm()
    prompt = list(range(100, 108))                 # exactly two full blocks
    a = computed(bm, make_proc(1, token_ids=prompt + [7, 7]), 9)
    assert len([b for b in a.block_ids if bm.blocks[b].hash != NO_HASH]) == 2
    twin = make_proc(2, token_ids=prompt)
    assert bm.match_prefix(twin) == 4              # block 1 holds its last token
    assert twin.num_computed_tokens < twin.num_tokens


def test_match_prefix_takes_cached_blocks_off_the_free_list():
    bm = make_bm()
    prompt = list(range(100, 110))
    a = computed(bm, make_proc(1, token_ids=prompt))
    shared = a.block_ids[:2]
    bm.free(a)
    b = make_proc(2, token_ids=prompt)
    assert bm.match_prefix(b) == 8 and b.block_ids == shared
    assert not set(shared) & set(bm.free_block_ids)
    check_block_invariants(bm, [a, b])


def test_match_prefix_verifies_token_ids_on_a_hash_hit():
    bm = make_bm()
    prompt = list(range(100, 110))
    a = computed(bm, make_proc(1, token_ids=prompt))
    bm.blocks[a.block_ids[0]].token_ids = (0, 0, 0, 0)   # as if the hash had collided
    assert bm.match_prefix(make_proc(2, token_ids=prompt)) == 0


def test_match_prefix_stops_at_the_first_different_block():
    bm = make_bm()
    a = computed(bm, make_proc(1, token_ids=list(range(100, 113))))
    b = make_proc(2, token_ids=list(range(100, 104)) + [0] + list(range(105, 113)))
    assert bm.match_prefix(b) == 4 and b.block_ids == a.block_ids[:1]


def test_prefix_cache_does_not_mix_models():
    bm = make_bm()
    prompt = list(range(100, 110))
    computed(bm, make_proc(1, token_ids=prompt, model="a"))
    assert bm.match_prefix(make_proc(2, token_ids=prompt, model="b")) == 0
    assert bm.match_prefix(make_proc(3, token_ids=prompt, model="a")) == 8


def test_blocks_are_cached_only_when_full_and_computed():
    bm, proc = make_bm(), make_proc(1, 10)
    bm.allocate(proc, 10)
    proc.num_computed_tokens = 7
    bm.cache_full_blocks(proc)
    assert [bm.blocks[b].hash != NO_HASH for b in proc.block_ids] == [True, False, False]
    proc.num_computed_tokens = 8
    bm.cache_full_blocks(proc)
    assert [bm.blocks[b].hash != NO_HASH for b in proc.block_ids] == [True, True, False]


# ----- fork -----
def test_fork_shares_full_blocks_and_copies_exactly_one_partial_block():
    bm = make_bm()
    parent = computed(bm, make_proc(1, 11))        # 10 computed: 2 full + 2 tokens
    child = make_proc(2, 0)
    copies = bm.fork(parent, child)
    assert child.block_ids[:2] == parent.block_ids[:2]
    assert copies == [(parent.block_ids[2], child.block_ids[2])]
    assert child.block_ids[2] != parent.block_ids[2]
    assert child.num_computed_tokens == 10
    assert [bm.blocks[b].ref_count for b in parent.block_ids[:2]] == [2, 2]
    check_block_invariants(bm, [parent, child])


def test_fork_with_a_full_last_block_copies_nothing():
    bm = make_bm()
    parent = computed(bm, make_proc(1, 9))         # 8 computed: two full blocks
    child = make_proc(2, 0)
    assert bm.fork(parent, child) == []
    assert child.block_ids == parent.block_ids and child.num_computed_tokens == 8
    check_block_invariants(bm, [parent, child])


def test_fork_pins_the_copy_blocks_until_end_step():
    bm = make_bm()
    parent = computed(bm, make_proc(1, 7))
    child = make_proc(2, 0)
    [(src, dst)] = bm.fork(parent, child)
    bm.free(parent)
    bm.free(child)
    assert bm.blocks[src].ref_count == 1 and bm.blocks[dst].ref_count == 1
    assert src not in bm.free_block_ids and dst not in bm.free_block_ids
    bm.end_step()
    assert bm.num_free_blocks == bm.num_blocks
    check_block_invariants(bm, [parent, child])


def test_fork_without_a_free_block_recomputes_the_partial_tail():
    bm = make_bm(num_blocks=2)
    parent = computed(bm, make_proc(1, 7))         # 6 computed: 1 full + 2
    child = make_proc(2, 0)
    assert bm.fork(parent, child) == []
    assert child.block_ids == parent.block_ids[:1] and child.num_computed_tokens == 4


def test_fork_of_a_swapped_parent_gives_the_child_no_kv():
    bm = make_bm()
    parent = computed(bm, make_proc(1, 7))
    bm.swap_out(parent)
    child = make_proc(2, 0)
    assert bm.fork(parent, child) == [] and child.block_ids == [] and child.num_computed_tokens == 0


# ----- swap and recompute -----
def test_swap_out_and_in_round_trips_block_counts():
    bm = make_bm()
    proc = computed(bm, make_proc(1, 11))
    table = list(proc.block_ids)
    out = bm.swap_out(proc)
    assert [dev for dev, _ in out] == table
    assert proc.block_ids == [] and [host for _, host in out] == proc.host_block_ids
    assert bm.num_free_blocks == 8 and bm.num_free_host_blocks == 5
    assert proc.num_computed_tokens == 10
    check_block_invariants(bm, [proc])
    back = bm.swap_in(proc)
    assert len(proc.block_ids) == 3 and proc.host_block_ids == []
    assert bm.num_free_blocks == 5
    bm.end_step()
    assert bm.num_free_host_blocks == 8 and proc.num_computed_tokens == 10
    assert {host for host, _ in back} <= {host for _, host in out}
    check_block_invariants(bm, [proc])


def test_swap_in_copies_every_block_back_when_nothing_is_cached():
    bm = make_bm()
    proc = computed(bm, make_proc(1, 11))
    out = bm.swap_out(proc)
    filler = make_proc(2, 32)
    bm.allocate(filler, 32)                        # evicts the cached device copies
    bm.free(filler)
    back = bm.swap_in(proc)
    assert [host for host, _ in back] == [host for _, host in out]
    assert proc.block_ids == [dev for _, dev in back] and proc.host_block_ids == []
    assert bm.num_free_host_blocks == 5            # the driver reads them this step
    bm.end_step()
    assert bm.num_free_host_blocks == 8
    check_block_invariants(bm, [proc, filler])


def test_swap_in_reuses_blocks_still_cached_on_the_device():
    bm = make_bm()
    proc = computed(bm, make_proc(1, 11))          # blocks 0,1 full and hashed
    full = proc.block_ids[:2]
    out = bm.swap_out(proc)
    back = bm.swap_in(proc)
    assert proc.block_ids[:2] == full              # reused, not copied
    assert len(back) == 1 and back[0][0] == out[2][1]
    check_block_invariants(bm, [proc])


def test_swap_out_needs_enough_host_blocks():
    bm = make_bm(num_host_blocks=2)
    proc = computed(bm, make_proc(1, 11))
    assert not bm.can_swap_out(proc)


def test_drop_frees_device_blocks_and_resets_computed_tokens():
    bm = make_bm()
    proc = computed(bm, make_proc(1, 11))
    bm.drop(proc)
    assert proc.num_computed_tokens == 0 and proc.block_ids == [] and bm.num_free_blocks == 8
    assert bm.match_prefix(proc) == 8              # the prefix cache brings the full blocks back


# ----- accounting -----
def test_kv_blocks_used_by_counts_each_users_table_entries():
    bm = make_bm()
    a = computed(bm, make_proc(1, 9, uid=10))
    b = computed(bm, make_proc(2, 5, uid=20))
    assert bm.kv_blocks_used_by(10) == 2 and bm.kv_blocks_used_by(20) == 1
    bm.swap_out(a)
    assert bm.kv_blocks_used_by(10) == 0
    bm.free(b)
    assert bm.kv_blocks_used_by(20) == 0


def test_meminfo_counts_used_shared_cached_and_swapped_blocks():
    bm = make_bm()
    prompt = list(range(100, 110))
    a = computed(bm, make_proc(1, token_ids=prompt))
    b = make_proc(2, token_ids=prompt)
    bm.match_prefix(b)
    c = computed(bm, make_proc(3, 5))
    bm.swap_out(c)
    d = computed(bm, make_proc(4, 9))
    bm.free(d)
    info = bm.meminfo([a, b, c, d])
    assert info["blocks_total"] == 8 and info["host_blocks_total"] == 8
    assert info["blocks_used"] == 3 and info["blocks_free"] == 5
    assert info["blocks_shared"] == 2
    assert info["blocks_cached"] == 3              # c's full block, d's two
    assert info["blocks_swapped"] == 1


def test_meminfo_utilization_is_high_when_sequences_fill_whole_blocks():
    bm = BlockManager(64, 0, block_size=16)
    procs = [computed(bm, make_proc(i, 65), 64) for i in range(4)]
    info = bm.meminfo(procs)
    assert info["utilization"] >= 0.96


def test_meminfo_waste_is_only_in_partial_last_blocks():
    bm = make_bm()
    procs = [computed(bm, make_proc(1, 7), 6), computed(bm, make_proc(2, 9), 8)]
    info = bm.meminfo(procs)
    assert info["blocks_used"] == 4
    assert info["utilization"] == pytest.approx(14 / 16)


# ----- recurrent state (hybrid models) -----
def test_state_blocks_lead_the_table_move_with_it_and_fork_copies_them():
    """Two blocks of recurrent state at the front of every table: allocated with the first KV,
    swapped with it, copied (never shared) by fork together with the partial last block, while
    full KV blocks are shared; there is no prefix cache."""
    bm = BlockManager(16, 16, block_size=BS, state_blocks=2)
    parent = make_proc(1, 10)
    assert bm.num_blocks_needed(parent, 9) == 2 + 3
    computed(bm, parent)                                  # 9 tokens: 2 full blocks + 1 partial
    assert len(parent.block_ids) == 5 and bm.match_prefix(make_proc(2, token_ids=parent.token_ids)) == 0
    assert all(bm.blocks[b].hash == NO_HASH for b in parent.block_ids)
    child = make_proc(3, token_ids=parent.token_ids)
    copies = bm.fork(parent, child)
    state, full, partial = parent.block_ids[:2], parent.block_ids[2:4], parent.block_ids[4]
    assert [src for src, _ in copies] == state + [partial]
    assert child.block_ids[2:4] == full and set(child.block_ids).isdisjoint(state + [partial])
    assert child.num_computed_tokens == 9
    bm.end_step()
    check_block_invariants(bm, [parent, child])
    pairs = bm.swap_out(child)
    assert [d for d, _ in pairs][:2] == [d for _, d in copies][:2]    # its state goes to host first
    bm.swap_in(child)
    bm.end_step()
    check_block_invariants(bm, [parent, child])


def test_fork_of_a_stateful_process_without_room_for_the_state_recomputes_the_child():
    bm = BlockManager(6, 0, block_size=BS, state_blocks=2)
    parent = computed(bm, make_proc(1, 10))               # 5 of 6 blocks
    child = make_proc(2, token_ids=parent.token_ids)
    assert bm.fork(parent, child) == [] and child.num_computed_tokens == 0 and not child.block_ids


def test_a_recurrent_only_model_holds_its_state_blocks_only_however_long_it_grows():
    """Mamba keeps no KV per token: a process holds its one state block from its first token to
    its last, fork copies it, swap moves it, and the quota counts it."""
    bm = BlockManager(4, 4, block_size=BS, state_blocks=1, token_blocks=False)
    parent = make_proc(1, 10)
    assert bm.num_blocks_needed(parent, 9) == 1 and bm.blocks_for_seq(10_000) == 1
    computed(bm, parent)
    assert len(parent.block_ids) == 1 and bm.num_blocks_needed(parent, 500) == 0
    child = make_proc(2, token_ids=parent.token_ids)
    copies = bm.fork(parent, child)
    assert copies == [(parent.block_ids[0], child.block_ids[0])] and child.num_computed_tokens == 9
    bm.end_step()
    check_block_invariants(bm, [parent, child])
    assert len(bm.swap_out(child)) == 1 and bm.num_free_blocks == 3
    bm.swap_in(child)
    bm.end_step()
    check_block_invariants(bm, [parent, child])
    assert bm.meminfo([parent, child])["blocks_used"] == 2
