"""The KV block pool: device blocks, host swap blocks, prefix cache, fork and swap.

Every block table change goes through this class; nobody else touches the free lists.
A device block is held by the block tables that list it (``ref_count``), plus one pin per
pending fork copy that reads or writes it. For quotas, each block also counts its holders per
user (``users``): a user holds a block once however many of its processes share it, and
``usage`` (a counter that may be shared by every pool of the kernel) is the number of distinct
device blocks each user holds. A block with ``ref_count == 0`` sits in
``free_block_ids`` but keeps its hash, so the prefix cache can still hand it out until the
block is reused for something else.

Prefix hashes are chained per full block: ``h_i = hash((h_{i-1}, tuple(tokens of block i)))``
with ``h_{-1}`` derived from the model and adapter names (their KV never matches). A hash
is only registered once the block is full *and* its KV is computed.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

from llmos.kernel.proc import Process

NO_HASH = -1   # Python's hash() never returns -1


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    users: dict = field(default_factory=dict)    # uid -> block tables of that user listing it
    hash: int = NO_HASH
    token_ids: tuple[int, ...] = ()      # the block's tokens while it holds a hash

    def reset(self) -> None:
        self.hash = NO_HASH
        self.token_ids = ()


def chain_hash(prev: int, token_ids: Iterable[int]) -> int:
    return hash((prev, tuple(token_ids)))


def seed_hash(model: str, adapter: str | None = None, variant: int = 0) -> int:
    """The chain's start: KV of another model, of the same model under another LoRA adapter, or
    of another KV variant (``kv_variant``: rope frequencies chosen by length), never matches."""
    return hash(("llmos-kv", model, adapter, variant))


class BlockManager:
    def __init__(self, num_blocks: int, num_host_blocks: int, block_size: int = 16,
                 usage: Counter | None = None, kv_variant: Callable[[int, int], int] | None = None,
                 state_blocks: int = 0, token_blocks: bool = True):
        if num_blocks < 1 or num_host_blocks < 0 or block_size < 1:
            raise ValueError("need num_blocks >= 1, num_host_blocks >= 0, block_size >= 1")
        self.block_size = block_size
        # (prompt length, tokens held) -> which KV the model computes for them (the driver's rope)
        self.kv_variant = kv_variant or (lambda prompt_len, seq_len: 0)
        # Blocks at the front of every table that hold the process's recurrent state (hybrid
        # models): allocated with its first KV, moved with it, copied (never shared) by fork.
        # Such models have no prefix cache: the state at a cached prefix is not kept.
        self.state_blocks = state_blocks
        # False for models with no attention layers (Mamba): tokens keep no KV, a process holds
        # its state blocks only.
        self.token_blocks = token_blocks
        self.blocks: list[Block] = [Block(i) for i in range(num_blocks)]
        # Ordered oldest-freed first: allocation takes the front, frees go to the back.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.host_blocks: list[Block] = [Block(i) for i in range(num_host_blocks)]
        self.free_host_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_host_blocks))
        self.num_blocks_by_uid: Counter[int] = Counter()    # distinct device blocks per user, this pool
        self.usage: Counter[int] = usage if usage is not None else Counter()   # the same, all pools
        # Blocks pinned by fork copies not yet handed to the driver, and host blocks read
        # by this step's swap-ins (a swap-out in the same step must not overwrite them).
        self.pinned_block_ids: list[int] = []
        self.host_ids_to_release: list[int] = []

    # ----- sizes -----
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_free_host_blocks(self) -> int:
        return len(self.free_host_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_for_seq(self, num_tokens: int) -> int:
        """Device blocks a process of ``num_tokens`` tokens holds: its state blocks and its KV."""
        return self.state_blocks + (self.blocks_for(num_tokens) if self.token_blocks else 0)

    def kv_blocks_used_by(self, uid: int) -> int:
        """Distinct device blocks of this pool held by ``uid``'s processes (a block its
        processes share counts once)."""
        return self.num_blocks_by_uid[uid]

    # ----- internal block moves -----
    def _take_free(self) -> Block:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"free block {block_id} has ref_count {block.ref_count}"
        assert not block.users, f"free block {block_id} still has holders {block.users}"
        if block.hash != NO_HASH and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.reset()
        block.ref_count = 1
        return block

    def _incref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _decref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} ref_count below zero"
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None

    def _set_table(self, proc: Process, block_ids: list[int]) -> None:
        old, uid = proc.block_ids, proc.uid
        if block_ids[:len(old)] == old:          # grown (the common case): count the new ones only
            removed, added = [], block_ids[len(old):]
        else:
            removed, added = old, block_ids
        for block_id in removed:
            self._drop_holder(block_id, uid)
        for block_id in added:
            self._add_holder(block_id, uid)
        proc.block_ids = block_ids

    def _add_holder(self, block_id: int, uid: int) -> None:
        users = self.blocks[block_id].users
        n = users.get(uid, 0)
        if n == 0:
            self.num_blocks_by_uid[uid] += 1
            self.usage[uid] += 1
        users[uid] = n + 1

    def _drop_holder(self, block_id: int, uid: int) -> None:
        users = self.blocks[block_id].users
        n = users[uid] - 1
        assert n >= 0, f"block {block_id} dropped by a user who did not hold it"
        if n == 0:
            del users[uid]
            self.num_blocks_by_uid[uid] -= 1
            self.usage[uid] -= 1
        else:
            users[uid] = n

    def _release_table(self, proc: Process) -> None:
        # Tail first, so a prefix's head blocks land last in the free list and live longest.
        for block_id in reversed(proc.block_ids):
            self._decref(block_id)
        self._set_table(proc, [])

    def _cached_block(self, h: int, token_ids: tuple[int, ...]) -> int | None:
        block_id = self.hash_to_block_id.get(h)
        if block_id is None or self.blocks[block_id].token_ids != token_ids:
            return None
        return block_id

    # ----- allocation -----
    def num_blocks_needed(self, proc: Process, num_new_tokens: int) -> int:
        """Device blocks to add so the table covers ``num_computed_tokens + num_new_tokens``
        (a swapped-out process counts its whole table: it comes back first)."""
        total = self.blocks_for_seq(proc.num_computed_tokens + num_new_tokens)
        return max(0, total - len(proc.block_ids))

    def can_allocate(self, proc: Process, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(proc, num_new_tokens) <= self.num_free_blocks

    def allocate(self, proc: Process, num_new_tokens: int) -> list[int]:
        """Extend the block table; returns the new block ids."""
        assert not proc.host_block_ids, f"pid {proc.pid} is swapped out"
        needed = self.num_blocks_needed(proc, num_new_tokens)
        assert needed <= self.num_free_blocks, "allocate without can_allocate"
        new_ids = [self._take_free().block_id for _ in range(needed)]
        self._set_table(proc, proc.block_ids + new_ids)
        return new_ids

    def free(self, proc: Process) -> None:
        """Release every device and host block of ``proc``; cached hashes survive."""
        self._release_table(proc)
        for host_id in proc.host_block_ids:
            self.host_blocks[host_id].reset()
            self.free_host_block_ids[host_id] = None
        proc.host_block_ids = []

    def drop(self, proc: Process) -> None:
        """Preempt for recompute: free the device KV; the prefix cache may bring some back."""
        self._release_table(proc)
        proc.num_computed_tokens = 0

    # ----- prefix cache -----
    def _seed(self, proc: Process) -> int:
        return seed_hash(proc.model, proc.adapter, self.kv_variant(proc.num_prompt_tokens, proc.num_tokens))

    def match_prefix(self, proc: Process) -> int:
        """Give a process with no KV the cached blocks of its longest cached prefix of full
        blocks; returns the tokens skipped (now ``num_computed_tokens``). The block holding
        the last token is never taken from the cache: its logits must be computed."""
        assert not proc.block_ids and not proc.host_block_ids and proc.num_computed_tokens == 0
        if self.state_blocks:
            return 0
        bs, h, matched = self.block_size, self._seed(proc), []
        for i in range((proc.num_tokens - 1) // bs):
            tokens = tuple(proc.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(h, tokens)
            block_id = self._cached_block(h, tokens)
            if block_id is None:
                break
            self._incref(block_id)
            matched.append(block_id)
        self._set_table(proc, matched)
        proc.num_computed_tokens = len(matched) * bs
        return proc.num_computed_tokens

    def first_uncached_hash(self, proc: Process, num_cached: int) -> int | None:
        """The chained hash of ``proc``'s first full prompt block past its ``num_cached`` tokens
        (None if there is none): two fresh processes with the same one would compute the same KV."""
        bs, end = self.block_size, num_cached + self.block_size
        if end > proc.num_prompt_tokens or self.state_blocks:
            return None
        h = self._seed(proc)
        for i in range(0, end, bs):
            h = chain_hash(h, proc.token_ids[i:i + bs])
        return h

    def cache_full_blocks(self, proc: Process) -> None:
        """Register the hashes of blocks that are full and computed (call after update)."""
        bs = self.block_size
        if self.state_blocks:
            return
        num_full = min(proc.num_computed_tokens // bs, len(proc.block_ids))
        first = num_full
        while first > 0 and self.blocks[proc.block_ids[first - 1]].hash == NO_HASH:
            first -= 1
        h = self.blocks[proc.block_ids[first - 1]].hash if first else self._seed(proc)
        for i in range(first, num_full):
            block = self.blocks[proc.block_ids[i]]
            block.token_ids = tuple(proc.token_ids[i * bs:(i + 1) * bs])
            h = block.hash = chain_hash(h, block.token_ids)
            self.hash_to_block_id[h] = block.block_id

    # ----- fork -----
    def fork(self, parent: Process, child: Process, may_copy: bool = True) -> list[tuple[int, int]]:
        """Share the parent's full computed blocks with ``child`` and copy a partial last
        block into a fresh one; returns the copies ``[(src, dst)]`` (zero or one). Both
        blocks of a copy stay pinned until ``end_step``. With no free block (or not
        ``may_copy``: the user's quota has no room) the child recomputes the partial tail
        instead. A parent without device KV gives nothing."""
        assert not child.block_ids and not child.host_block_ids
        bs = self.block_size
        if parent.host_block_ids or not parent.block_ids:
            child.num_computed_tokens = 0
            return []
        if self.state_blocks:
            return self._fork_with_state(parent, child, may_copy)
        num_full, partial = divmod(parent.num_computed_tokens, bs)
        shared = parent.block_ids[:num_full]
        for block_id in shared:
            self._incref(block_id)
        copies = []
        if partial and self.free_block_ids and may_copy:
            src, dst = parent.block_ids[num_full], self._take_free().block_id
            copies.append((src, dst))
            self._incref(src)                  # pins: held until the driver has copied
            self._incref(dst)
            self.pinned_block_ids += [src, dst]
            self._set_table(child, shared + [dst])
            child.num_computed_tokens = parent.num_computed_tokens
        else:
            self._set_table(child, shared)
            child.num_computed_tokens = num_full * bs
        return copies

    def _fork_with_state(self, parent: Process, child: Process, may_copy: bool) -> list[tuple[int, int]]:
        """The child gets copies of the parent's state blocks and of its partial last block, and
        shares its full KV blocks; without room for the copies it recomputes everything (a KV
        prefix without the state at its end is of no use)."""
        k, bs = self.state_blocks, self.block_size
        num_full, partial = divmod(parent.num_computed_tokens, bs)
        private = parent.block_ids[:k] + parent.block_ids[k + num_full:k + num_full + (1 if partial else 0)]
        if not may_copy or len(private) > self.num_free_blocks:
            child.num_computed_tokens = 0
            return []
        copies = [(src, self._take_free().block_id) for src in private]
        for src, dst in copies:
            self._incref(src)                  # pins: held until the driver has copied
            self._incref(dst)
            self.pinned_block_ids += [src, dst]
        shared = parent.block_ids[k:k + num_full]
        for block_id in shared:
            self._incref(block_id)
        dst = [d for _, d in copies]
        self._set_table(child, dst[:k] + shared + dst[k:])
        child.num_computed_tokens = parent.num_computed_tokens
        return copies

    def is_pinned(self, proc: Process) -> bool:
        return bool(self.pinned_block_ids) and not set(proc.block_ids).isdisjoint(self.pinned_block_ids)

    def end_step(self) -> None:
        """The plan is built: drop fork pins, and release host blocks read by swap-ins."""
        for block_id in self.pinned_block_ids:
            self._decref(block_id)
        self.pinned_block_ids = []
        for host_id in self.host_ids_to_release:
            self.host_blocks[host_id].reset()
            self.free_host_block_ids[host_id] = None
        self.host_ids_to_release = []

    # ----- swap -----
    def can_swap_out(self, proc: Process) -> bool:
        return len(proc.block_ids) <= self.num_free_host_blocks

    def swap_out(self, proc: Process) -> list[tuple[int, int]]:
        """Copy every device block to a host block and release the device blocks;
        returns ``[(device, host)]``. ``num_computed_tokens`` is kept."""
        assert self.can_swap_out(proc) and not proc.host_block_ids
        pairs = []
        for block_id in proc.block_ids:
            host_id, _ = self.free_host_block_ids.popitem(last=False)
            block, host = self.blocks[block_id], self.host_blocks[host_id]
            host.hash, host.token_ids = block.hash, block.token_ids
            pairs.append((block_id, host_id))
        self._release_table(proc)
        proc.host_block_ids = [host_id for _, host_id in pairs]
        return pairs

    def can_swap_in(self, proc: Process) -> bool:
        return len(proc.host_block_ids) <= self.num_free_blocks

    def swap_in(self, proc: Process) -> list[tuple[int, int]]:
        """Bring the host blocks back into fresh device blocks; returns ``[(host, device)]``.
        A block whose hash is still cached on the device is reused instead of copied. The
        host blocks are released at ``end_step`` (the driver reads them this step)."""
        assert self.can_swap_in(proc) and not proc.block_ids
        pairs, table = [], []
        for host_id in proc.host_block_ids:
            host = self.host_blocks[host_id]
            block_id = self._cached_block(host.hash, host.token_ids) if host.hash != NO_HASH else None
            if block_id is not None:
                self._incref(block_id)
            else:
                block = self._take_free()
                block.hash, block.token_ids = host.hash, host.token_ids
                if host.hash != NO_HASH:
                    self.hash_to_block_id[host.hash] = block.block_id
                block_id = block.block_id
                pairs.append((host_id, block_id))
            table.append(block_id)
        self._set_table(proc, table)
        self.host_ids_to_release += proc.host_block_ids
        proc.host_block_ids = []
        return pairs

    # ----- reporting -----
    def meminfo(self, procs: Iterable[Process] = ()) -> dict:
        """Pool numbers. ``utilization`` = computed tokens stored / (used blocks * block_size),
        counting a shared block once; waste lives only in partial last blocks."""
        fill: dict[int, int] = {}
        k = self.state_blocks                             # state blocks count as full
        for proc in procs:
            for i, block_id in enumerate(proc.block_ids):
                n = min(self.block_size, max(0, proc.num_computed_tokens - (i - k) * self.block_size))
                fill[block_id] = max(fill.get(block_id, 0), n)
        used = self.num_blocks - self.num_free_blocks
        num_host = len(self.host_blocks)
        return {
            "block_size": self.block_size,
            "blocks_total": self.num_blocks,
            "blocks_used": used,
            "blocks_free": self.num_free_blocks,
            "blocks_shared": sum(1 for b in self.blocks if b.ref_count > 1),
            "blocks_cached": sum(1 for i in self.free_block_ids if self.blocks[i].hash != NO_HASH),
            "blocks_swapped": num_host - self.num_free_host_blocks,
            "host_blocks_total": num_host,
            "utilization": sum(fill.values()) / (used * self.block_size) if used else 0.0,
        }
