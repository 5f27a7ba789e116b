"""Stateful property tests of the block pool + per-sequence cache manager.

Any interleaving of allocate / grow / append / fork / truncate / free must keep the pool's
invariants: no double free, no leak, no negative counts, and never a pop or truncate past a
sequence's length (the MLC-LLM "sequence only has length 202, while the length of pop is 304").
A violating call raises a typed error and changes nothing.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_hashes import block_hashes
from engine.block_pool import BlockPool
from engine.errors import BlockAccountingError, OutOfBlocks
from engine.kv_cache_manager import KvCacheManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BLOCK_SIZE = 4
NUM_BLOCKS = 24


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = KvCacheManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=True)
        self.live: list[Sequence] = []
        self.counter = 0

    def _new_seq(self, tokens: list[int]) -> Sequence:
        self.counter += 1
        return Sequence(f"s{self.counter}", list(tokens), SamplingParams())

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=30))
    def allocate(self, tokens: list[int]) -> None:
        seq = self._new_seq(tokens)
        free_before = self.cache.pool.num_free
        if self.cache.can_allocate(seq):
            cached = self.cache.allocate(seq)
            assert cached % BLOCK_SIZE == 0 and cached < seq.num_prompt_tokens
            assert len(seq.block_table) == self.cache.blocks_for(seq.num_tokens)
            self.live.append(seq)
        else:
            with pytest.raises(OutOfBlocks):
                self.cache.allocate(seq)
            assert self.cache.pool.num_free == free_before

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 9))
    def append_tokens(self, data: st.DataObject, n: int) -> None:
        seq = data.draw(st.sampled_from(self.live))
        target = seq.num_tokens + n
        if self.cache.can_grow(seq, target):
            self.cache.grow(seq, target)
            seq.token_ids.extend([1] * n)
            seq.num_computed_tokens = seq.num_tokens
            self.cache.commit_computed(seq)
        else:
            table = list(seq.block_table)
            with pytest.raises(OutOfBlocks):
                self.cache.grow(seq, target)
            assert seq.block_table == table

    @precondition(lambda self: self.live)
    @rule(data=st.data(), delta=st.integers(-40, 40))
    def truncate(self, data: st.DataObject, delta: int) -> None:
        seq = data.draw(st.sampled_from(self.live))
        new_len = seq.num_tokens + delta
        if seq.num_prompt_tokens <= new_len <= seq.num_tokens:
            self.cache.truncate(seq, new_len)
            assert seq.num_tokens == new_len
        else:
            before = (list(seq.token_ids), list(seq.block_table), self.cache.pool.num_free)
            with pytest.raises(BlockAccountingError, match="length"):
                self.cache.truncate(seq, new_len)
            assert (seq.token_ids, seq.block_table, self.cache.pool.num_free) == before

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(self.live))
        child = self._new_seq(parent.token_ids)
        child.num_prompt_tokens = parent.num_prompt_tokens
        try:
            copies = self.cache.fork(parent, child)
        except OutOfBlocks:
            assert not child.block_table
            return
        assert all(src != dst for src, dst in copies)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.cache.free(seq)
        assert seq.block_table == []

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def double_free_is_refused(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        owned = [b for b in seq.block_table if self.cache.pool.ref_count(b) == 1]
        if not owned:
            return
        with pytest.raises(BlockAccountingError):
            self.cache.pool.decref_all([owned[0], owned[0]])

    @invariant()
    def pool_is_consistent(self) -> None:
        pool = self.cache.pool
        pool.check_integrity()
        expected_refs: dict[int, int] = {}
        for seq in self.live:
            for b in seq.block_table:
                expected_refs[b] = expected_refs.get(b, 0) + 1
        for b in range(NUM_BLOCKS):
            assert pool.ref_count(b) == expected_refs.get(b, 0) >= 0
        assert pool.num_used == len(expected_refs)
        assert pool.num_free + pool.num_used == NUM_BLOCKS

    def teardown(self) -> None:
        for seq in self.live:
            self.cache.free(seq)
        assert self.cache.pool.num_used == 0
        self.cache.pool.check_integrity()


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_prefix_hit_is_exact() -> None:
    cache = KvCacheManager(16, BLOCK_SIZE)
    a = Sequence("a", list(range(10)), SamplingParams())
    cache.allocate(a)
    a.num_computed_tokens = a.num_tokens
    cache.commit_computed(a)
    same_prefix = Sequence("b", [*range(8), 99, 98, 97], SamplingParams())
    assert cache.allocate(same_prefix) == 8
    assert same_prefix.block_table[:2] == a.block_table[:2]
    other = Sequence("c", [0, 1, 2, 4, 4, 5, 6, 7, 8], SamplingParams())
    assert cache.allocate(other) == 0


def test_full_prompt_hit_leaves_a_token_to_compute() -> None:
    cache = KvCacheManager(16, BLOCK_SIZE)
    a = Sequence("a", list(range(8)), SamplingParams())
    cache.allocate(a)
    a.num_computed_tokens = 8
    cache.commit_computed(a)
    cache.free(a)
    b = Sequence("b", list(range(8)), SamplingParams())
    assert cache.allocate(b) == 4  # the last block is recomputed so there are logits to sample
    assert cache.pool.num_used == 2


def test_hashes_are_deterministic_and_chained() -> None:
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert (block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)[1]
            != block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)[1])


def test_pool_rejects_bad_ids_and_exhaustion_without_change() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    assert pool.num_free == 1
    with pytest.raises(BlockAccountingError):
        pool.decref_all([blocks[0], 7])
    assert pool.ref_count(blocks[0]) == 1
    pool.decref_all(blocks)
    assert pool.num_used == 0
