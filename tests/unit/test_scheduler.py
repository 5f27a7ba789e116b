"""The continuous-batching scheduler with no model (vLLM's `tests/v1/core` style).

`create_scheduler(...)` builds a Scheduler on a KvCacheManager of `num_blocks` blocks;
`create_requests(...)` makes sequences; `step(...)` schedules, feeds fake `SampleResult`s (one
for every sequence whose step completes its tokens) to `postprocess`, and checks the block
accounting after `schedule` and after `postprocess`: the pool is consistent, free + used ==
total, every block's reference count equals the number of block tables that hold it, and a
waiting sequence holds no block.

The cache manager alone is property-tested in test_block_allocator.py and preemption with a
real model in test_preemption.py; this file covers the scheduler's own decisions.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable

import pytest

from engine.errors import RequestError
from engine.kv_cache_manager import KvCacheManager
from engine.model_runner import ScheduledSeq
from engine.sampler import SampleResult
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import FinishReason, SeqStatus, Sequence

EOS_TOKEN_ID = 50256
OUTPUT_BASE = 10_000  # fake output token i of a sequence is OUTPUT_BASE + i (see `counting`)

TokenOf = Callable[[Sequence], int]


# ---- factories ----------------------------------------------------------------------------------
def create_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 16,
                     max_num_batched_tokens: int = 64, max_model_len: int = 128,
                     enable_prefix_caching: bool = True,
                     eos_token_ids: tuple[int, ...] = (EOS_TOKEN_ID,)) -> Scheduler:
    cache = KvCacheManager(num_blocks, block_size, enable_prefix_caching)
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len)
    return Scheduler(config, cache, eos_token_ids)


def sampling(max_tokens: int = 16, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]


def create_requests(num_requests: int, prompt_len: int = 10, max_tokens: int = 16,
                    same_prompt: bool = False, first_index: int = 0,
                    **params: object) -> list[Sequence]:
    """Sequences `req-<i>`; prompts differ by request (no accidental prefix hits) unless
    `same_prompt`; `params` go to SamplingParams."""
    return [Sequence(f"req-{i}", [1 if same_prompt else 1000 + i] * prompt_len,
                     sampling(max_tokens, **params))
            for i in range(first_index, first_index + num_requests)]


def counting(seq: Sequence) -> int:
    """The fake model: output token i is OUTPUT_BASE + i, so a lost or repeated token shows."""
    return OUTPUT_BASE + seq.num_output_tokens


def fake_results(batch: list[ScheduledSeq],
                 token_of: TokenOf = counting) -> dict[str, SampleResult]:
    """What the model runner returns: a token for each sequence whose step completes it."""
    return {s.seq.seq_id: SampleResult(token_of(s.seq), None) for s in batch if s.completes}


# ---- invariants ---------------------------------------------------------------------------------
def assert_accounting(scheduler: Scheduler, also_holding: Iterable[Sequence] = ()) -> None:
    pool, cache = scheduler.cache.pool, scheduler.cache
    pool.check_integrity()
    assert pool.num_free + pool.num_used == pool.num_blocks
    holders = [*scheduler.running, *also_holding]
    refs = Counter(b for seq in holders for b in seq.block_table)
    assert [pool.ref_count(b) for b in range(pool.num_blocks)] == \
        [refs[b] for b in range(pool.num_blocks)]
    assert pool.num_used == len(refs)
    for seq in scheduler.waiting:
        assert seq.status is SeqStatus.WAITING
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    for seq in scheduler.running:
        assert seq.status is SeqStatus.RUNNING
        assert len(seq.block_table) >= cache.blocks_for(seq.num_computed_tokens)
    stats = scheduler.stats
    assert 0 <= stats.num_prefix_hit_tokens <= stats.num_prompt_tokens
    assert stats.num_preemptions >= 0


def step(scheduler: Scheduler, token_of: TokenOf = counting,
         ) -> tuple[list[ScheduledSeq], list[Sequence]]:
    """One engine step without a model; returns (batch, sequences finished by it)."""
    batch = scheduler.schedule()
    assert_accounting(scheduler)
    assert sum(s.num_tokens for s in batch) <= scheduler.config.max_num_batched_tokens
    assert len({s.seq.seq_id for s in batch}) == len(batch)
    assert len(scheduler.running) <= scheduler.config.max_num_seqs
    for s in batch:
        assert s.num_tokens > 0 and s.seq in scheduler.running
        assert len(s.seq.block_table) >= \
            scheduler.cache.blocks_for(s.seq.num_computed_tokens + s.num_tokens)
    finished = scheduler.postprocess(batch, fake_results(batch, token_of))
    assert_accounting(scheduler)
    for seq in finished:
        assert seq.is_finished and seq.block_table == [] and seq not in scheduler.running
    return batch, finished


def run_to_completion(scheduler: Scheduler, token_of: TokenOf = counting,
                      max_steps: int = 1000) -> list[Sequence]:
    finished: list[Sequence] = []
    for _ in range(max_steps):
        if not scheduler.has_work:
            break
        finished += step(scheduler, token_of)[1]
    assert not scheduler.has_work, f"still working after {max_steps} steps"
    assert scheduler.cache.pool.num_used == 0
    return finished


def shape(batch: list[ScheduledSeq]) -> list[tuple[str, int]]:
    return [(s.seq.seq_id, s.num_tokens) for s in batch]


# ---- admission ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("prompt_len", "match"), [
    (0, "empty"),
    (32, "max-model-len 32"),  # no room for one output token
    (40, "max-model-len 32"),
])
def test_inadmissible_prompt_fails_alone(prompt_len: int, match: str) -> None:
    scheduler = create_scheduler(max_model_len=32)
    [ok] = create_requests(1, prompt_len=8)
    scheduler.add(ok)
    bad = Sequence("bad", [5] * prompt_len, sampling())
    with pytest.raises(RequestError, match=match):
        scheduler.add(bad)
    assert list(scheduler.waiting) == [ok]
    assert_accounting(scheduler)


def test_prompt_that_can_never_fit_the_cache_is_refused_and_the_largest_that_fits_runs() -> None:
    scheduler = create_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    too_big = Sequence("big", [5] * 16, sampling())  # 16 + 1 tokens need 5 blocks of 4
    with pytest.raises(RequestError, match=r"more KV blocks than the cache has \(4\)"):
        scheduler.check_admissible(too_big)
    [largest] = create_requests(1, prompt_len=15, max_tokens=1)
    scheduler.add(largest)
    _, finished = step(scheduler)
    assert finished == [largest] and largest.finish_reason is FinishReason.LENGTH


# ---- chunked prefill and batching ---------------------------------------------------------------
def test_long_prompt_is_prefilled_in_chunks_under_the_token_budget() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=16, max_model_len=128)
    [seq] = create_requests(1, prompt_len=50, max_tokens=3)
    scheduler.add(seq)
    chunks = []

    def is_prefill_done() -> bool:
        return seq.num_computed_tokens >= seq.num_prompt_tokens

    while not is_prefill_done():
        batch, _ = step(scheduler)
        assert [s.seq for s in batch] == [seq]
        chunks.append(batch[0].num_tokens)
        assert seq.num_computed_tokens == sum(chunks)
        assert seq.num_output_tokens == (1 if is_prefill_done() else 0)  # sampled at the end only
    assert chunks == [16, 16, 16, 2]
    decodes = []
    while not seq.is_finished:
        batch, _ = step(scheduler)
        decodes.append(shape(batch))
    assert decodes == [[("req-0", 1)], [("req-0", 1)]]
    assert seq.output_ids == [OUTPUT_BASE, OUTPUT_BASE + 1, OUTPUT_BASE + 2]
    assert seq.finish_reason is FinishReason.LENGTH and scheduler.cache.pool.num_used == 0


def test_decodes_go_first_and_a_new_prefill_takes_the_rest_of_the_budget() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=16)
    [a] = create_requests(1, prompt_len=4, max_tokens=20)
    [b] = create_requests(1, prompt_len=40, max_tokens=2, first_index=1)
    scheduler.add(a)
    assert shape(step(scheduler)[0]) == [("req-0", 4)]
    scheduler.add(b)
    shapes = [shape(step(scheduler)[0]) for _ in range(4)]
    assert shapes == [[("req-0", 1), ("req-1", 15)],
                      [("req-0", 1), ("req-1", 15)],
                      [("req-0", 1), ("req-1", 10)],  # b's last chunk: b samples its first token
                      [("req-0", 1), ("req-1", 1)]]
    assert b.num_output_tokens == 2 and b.is_finished
    assert a.num_output_tokens == 5 and not a.is_finished


def test_waiting_requests_fill_the_budget_the_last_one_chunked() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=16)
    for seq in create_requests(4, prompt_len=10, max_tokens=4):
        scheduler.add(seq)
    assert shape(step(scheduler)[0]) == [("req-0", 10), ("req-1", 6)]
    assert shape(step(scheduler)[0]) == [("req-0", 1), ("req-1", 4), ("req-2", 10), ("req-3", 1)]
    assert [s.seq_id for s in scheduler.running] == ["req-0", "req-1", "req-2", "req-3"]


def test_max_num_seqs_caps_the_running_batch_and_admission_is_fifo() -> None:
    scheduler = create_scheduler(max_num_seqs=2, max_num_batched_tokens=256)
    seqs = create_requests(5, prompt_len=4, max_tokens=3)
    for seq in seqs:
        scheduler.add(seq)
    admitted: list[str] = []
    while scheduler.has_work:
        batch, _ = step(scheduler)
        assert len(scheduler.running) <= 2
        admitted += [s.seq.seq_id for s in batch if s.seq.seq_id not in admitted]
    assert admitted == [s.seq_id for s in seqs]
    assert all(s.num_output_tokens == 3 for s in seqs)
    assert scheduler.cache.pool.num_used == 0


def test_admission_is_first_come_first_served_even_when_a_later_one_would_fit() -> None:
    scheduler = create_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=256)
    [a] = create_requests(1, prompt_len=12, max_tokens=2)  # 3 blocks
    [b] = create_requests(1, prompt_len=13, max_tokens=2, first_index=1)  # 4 blocks: waits
    [c] = create_requests(1, prompt_len=2, max_tokens=2, first_index=2)  # 1 block: would fit
    for seq in (a, b, c):
        scheduler.add(seq)
    batch, _ = step(scheduler)
    assert [s.seq for s in batch] == [a] and list(scheduler.waiting) == [b, c]
    assert scheduler.cache.pool.num_free == 3
    run_to_completion(scheduler)
    assert all(s.num_output_tokens == 2 for s in (a, b, c))


# ---- preemption ---------------------------------------------------------------------------------
def test_out_of_blocks_preempts_the_newest_keeps_its_tokens_and_leaks_nothing() -> None:
    scheduler = create_scheduler(num_blocks=8, block_size=4, max_num_seqs=2,
                                 max_num_batched_tokens=64)
    a, b, c = create_requests(3, prompt_len=12, max_tokens=10, ignore_eos=True)
    for seq in (a, b, c):
        scheduler.add(seq)
    preempted_at = None
    for i in range(100):
        if not scheduler.has_work:
            break
        outputs_before = list(b.output_ids)
        batch, _ = step(scheduler)
        if preempted_at is None and scheduler.stats.num_preemptions:
            preempted_at = i
            assert [s.seq for s in batch] == [a]  # b gave its blocks to a; no admission this step
            assert list(scheduler.waiting) == [b, c]  # back at the front, ahead of c
            assert b.status is SeqStatus.WAITING and b.block_table == []
            assert b.output_ids == outputs_before and b.num_output_tokens == 5  # tokens kept
    assert preempted_at is not None  # (b and c may preempt each other later on)
    assert not scheduler.has_work and scheduler.cache.pool.num_used == 0
    want = [OUTPUT_BASE + i for i in range(10)]  # nothing lost or repeated by the recompute
    assert a.output_ids == b.output_ids == c.output_ids == want


def test_preempted_sequence_recomputes_prompt_and_outputs_with_prefix_hits() -> None:
    scheduler = create_scheduler(num_blocks=8, block_size=4, max_num_seqs=2)
    a, b = create_requests(2, prompt_len=12, max_tokens=10, ignore_eos=True)
    scheduler.add(a)
    scheduler.add(b)
    while not scheduler.stats.num_preemptions:
        step(scheduler)
    while b.status is SeqStatus.WAITING:
        num_tokens = b.num_tokens
        batch, _ = step(scheduler)
    [rerun] = [s for s in batch if s.seq is b]
    # its prompt blocks stayed cached (b freed them tail first): only the rest is recomputed,
    # outputs included, and the step samples b's next token; those self-hits are not counted
    # as prefix-cache hits (num_cached_tokens keeps its first admission's 0)
    assert rerun.num_tokens == num_tokens - 8 and b.num_cached_tokens == 0
    assert b.num_tokens == num_tokens + 1
    run_to_completion(scheduler)
    assert b.output_ids == [OUTPUT_BASE + i for i in range(10)]


def test_each_preemption_takes_the_newest_running_sequence() -> None:
    scheduler = create_scheduler(num_blocks=9, block_size=4, max_num_batched_tokens=64)
    [a] = create_requests(1, prompt_len=23, max_tokens=10, ignore_eos=True)  # 6 blocks
    b, c = create_requests(2, prompt_len=3, max_tokens=20, ignore_eos=True, first_index=1)
    for seq in (a, b, c):
        scheduler.add(seq)
    step(scheduler)
    assert scheduler.cache.pool.num_free == 1
    while scheduler.stats.num_preemptions < 1:  # a takes the last block, b then needs one
        step(scheduler)
    assert scheduler.running == [a, b] and list(scheduler.waiting) == [c]
    while scheduler.stats.num_preemptions < 2:  # a needs another: b goes, ahead of c
        step(scheduler)
    assert scheduler.running == [a] and list(scheduler.waiting) == [b, c]
    run_to_completion(scheduler)
    assert a.output_ids == [OUTPUT_BASE + i for i in range(10)]
    assert b.output_ids == c.output_ids == [OUTPUT_BASE + i for i in range(20)]


# ---- prefix cache -------------------------------------------------------------------------------
def test_second_request_with_the_same_prefix_reuses_its_blocks() -> None:
    scheduler = create_scheduler(block_size=4, num_blocks=32)
    shared = list(range(100, 116))  # 4 full blocks
    a = Sequence("a", [*shared, 1, 2, 3], sampling(max_tokens=8))
    b = Sequence("b", [*shared, 4, 5], sampling(max_tokens=8))
    scheduler.add(a)
    step(scheduler)
    scheduler.add(b)
    batch, _ = step(scheduler)
    assert shape(batch) == [("a", 1), ("b", 2)]  # b computes only its own 2 tokens
    assert b.num_cached_tokens == 16 and b.block_table[:4] == a.block_table[:4]
    assert all(scheduler.cache.pool.ref_count(blk) == 2 for blk in a.block_table[:4])
    assert scheduler.stats.num_prefix_hit_tokens == 16
    assert scheduler.stats.num_prompt_tokens == 19 + 18
    assert scheduler.cache.pool.num_used == 5 + 1
    scheduler.abort("a")  # b keeps the shared blocks
    assert_accounting(scheduler)
    assert all(scheduler.cache.pool.ref_count(blk) == 1 for blk in b.block_table[:4])
    run_to_completion(scheduler)
    again = Sequence("c", [*shared, 4, 5], sampling(max_tokens=1))  # revives cached free blocks
    scheduler.add(again)
    batch, _ = step(scheduler)
    assert shape(batch) == [("c", 2)] and again.num_cached_tokens == 16
    assert scheduler.stats.num_prefix_hit_tokens == 32


def test_prefix_hits_cover_only_chunks_already_computed() -> None:
    scheduler = create_scheduler(block_size=4, max_num_batched_tokens=16)
    prompt = list(range(200, 224))  # 24 tokens: chunks 16 + 8
    a = Sequence("a", prompt, sampling())
    b = Sequence("b", [*prompt[:20], 7, 7, 7], sampling())
    scheduler.add(a)
    step(scheduler)  # a has computed 16 tokens; its blocks 0..3 are published
    scheduler.add(b)
    batch, _ = step(scheduler)  # a's last chunk (8), then b with the 8 left
    assert shape(batch) == [("a", 8), ("b", 7)]
    assert b.num_cached_tokens == 16  # not 20: a's 5th block was not computed at b's admission


def test_identical_prompt_still_computes_its_last_block() -> None:
    scheduler = create_scheduler(block_size=4)
    a, b = create_requests(2, prompt_len=16, same_prompt=True, max_tokens=4)
    scheduler.add(a)
    step(scheduler)
    scheduler.add(b)
    batch, _ = step(scheduler)
    assert shape(batch) == [("req-0", 1), ("req-1", 4)] and b.num_cached_tokens == 12
    assert b.num_output_tokens == 1  # sampled from its own last block's logits


def test_without_prefix_caching_nothing_is_shared() -> None:
    scheduler = create_scheduler(block_size=4, enable_prefix_caching=False)
    a, b = create_requests(2, prompt_len=16, same_prompt=True, max_tokens=4)
    scheduler.add(a)
    step(scheduler)
    scheduler.add(b)
    batch, _ = step(scheduler)
    assert shape(batch) == [("req-0", 1), ("req-1", 16)]
    assert not set(a.block_table) & set(b.block_table)
    assert scheduler.stats.num_prefix_hit_tokens == 0


# ---- abort --------------------------------------------------------------------------------------
def test_abort_of_waiting_running_and_preempted_sequences_frees_their_blocks() -> None:
    scheduler = create_scheduler(num_blocks=8, block_size=4, max_num_seqs=2,
                                 max_num_batched_tokens=8, max_model_len=32)
    a, b, c = create_requests(3, prompt_len=12, max_tokens=30, ignore_eos=True)
    for seq in (a, b, c):
        scheduler.add(seq)
    step(scheduler)  # a: a chunk of 8; b and c wait (no budget left)
    assert scheduler.abort("req-2") is c and c.finish_reason is FinishReason.ABORT
    assert c.is_finished and list(scheduler.waiting) == [b]
    assert_accounting(scheduler)
    assert scheduler.abort("req-0") is a and a.block_table == []  # running, mid-prefill
    assert_accounting(scheduler)
    assert scheduler.cache.pool.num_used == 0
    assert scheduler.abort("req-0") is None and scheduler.abort("nope") is None
    [d] = create_requests(1, prompt_len=12, max_tokens=30, ignore_eos=True, first_index=3)
    scheduler.add(d)
    while not scheduler.stats.num_preemptions:
        step(scheduler)
    assert list(scheduler.waiting) == [d] and d.num_output_tokens > 0
    assert scheduler.abort("req-3") is d
    assert d.finish_reason is FinishReason.ABORT and not scheduler.waiting
    assert_accounting(scheduler)
    run_to_completion(scheduler)
    assert b.finish_reason is FinishReason.LENGTH and b.num_tokens == 32


# ---- finishing ----------------------------------------------------------------------------------
def always(token: int) -> TokenOf:
    return lambda seq: token


@pytest.mark.parametrize(("params", "token_of", "num_outputs", "reason"), [
    (dict(max_tokens=3), counting, 3, FinishReason.LENGTH),
    (dict(max_tokens=1), counting, 1, FinishReason.LENGTH),  # ends on the prefill's token
    (dict(max_tokens=9), lambda s: EOS_TOKEN_ID if s.num_output_tokens == 2 else 5, 3,
     FinishReason.STOP),
    (dict(max_tokens=4, ignore_eos=True), always(EOS_TOKEN_ID), 4, FinishReason.LENGTH),
    (dict(max_tokens=9, stop_token_ids=(55,)), lambda s: 55 if s.num_output_tokens == 1 else 5, 2,
     FinishReason.STOP),
    (dict(max_tokens=9, stop_token_ids=(55,), ignore_eos=True), always(55), 1, FinishReason.STOP),
    (dict(max_tokens=9, min_tokens=3), always(EOS_TOKEN_ID), 3, FinishReason.STOP),
    (dict(max_tokens=100), counting, 10, FinishReason.LENGTH),  # max_model_len 20 - prompt 10
])
def test_finish_reasons(params: dict, token_of: TokenOf, num_outputs: int,
                        reason: FinishReason) -> None:
    scheduler = create_scheduler(max_model_len=20)
    [seq] = create_requests(1, prompt_len=10, **params)
    scheduler.add(seq)
    finished = run_to_completion(scheduler, token_of)
    assert finished == [seq]
    assert seq.num_output_tokens == num_outputs and seq.finish_reason is reason
    assert seq.status is SeqStatus.FINISHED and scheduler.cache.pool.num_used == 0


def test_detached_sequence_keeps_its_blocks_until_the_caller_frees_them() -> None:
    scheduler = create_scheduler()
    [seq] = create_requests(1, prompt_len=10)
    scheduler.add(seq)
    batch = scheduler.schedule()
    [sampled] = scheduler.advance(batch, fake_results(batch))
    scheduler.detach(sampled)  # what a prefill worker does until the KV is acked
    assert not scheduler.has_work and seq.is_finished and len(seq.block_table) == 3
    assert_accounting(scheduler, also_holding=[seq])
    scheduler.cache.free(seq)
    assert_accounting(scheduler)
    assert scheduler.cache.pool.num_used == 0


# ---- everything at once -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_load_under_a_tight_cache_keeps_accounting_and_outputs(seed: int) -> None:
    """Arrivals, shared prefixes, chunked prefills, aborts and preemptions on 24 blocks: the
    accounting holds after every step, every sequence ends, none loses or repeats a token."""
    rng = random.Random(seed)
    scheduler = create_scheduler(num_blocks=24, block_size=4, max_num_seqs=6,
                                 max_num_batched_tokens=20, max_model_len=48)
    prefixes = [[rng.randrange(50, 60) for _ in range(12)] for _ in range(3)]
    seqs: list[Sequence] = []
    sampled: dict[str, list[int]] = {}

    def model(seq: Sequence) -> int:
        token = EOS_TOKEN_ID if rng.random() < 0.03 else rng.randrange(100, 200)
        sampled.setdefault(seq.seq_id, []).append(token)
        return token

    for _ in range(1000):
        if len(seqs) < 30 and rng.random() < 0.3:
            prompt = rng.choice(prefixes)[:rng.randrange(0, 13)]
            prompt += [rng.randrange(60, 70) for _ in range(rng.randrange(1, 20))]
            seq = Sequence(f"r{len(seqs)}", prompt,
                           sampling(rng.randrange(1, 24), ignore_eos=rng.random() < 0.5))
            scheduler.add(seq)
            seqs.append(seq)
        if seqs and rng.random() < 0.03:
            scheduler.abort(rng.choice(seqs).seq_id)
            assert_accounting(scheduler)
        step(scheduler, model)
        if len(seqs) == 30 and not scheduler.has_work:
            break
    assert not scheduler.has_work and len(seqs) == 30
    assert scheduler.stats.num_preemptions > 0, "the schedule must exercise preemption"
    assert scheduler.cache.pool.num_used == 0
    for seq in seqs:
        assert seq.is_finished and seq.block_table == []
        assert seq.output_ids == sampled.get(seq.seq_id, []), seq.seq_id  # each token once
        assert len(seq.output_ids) <= seq.params.max_tokens
        if seq.finish_reason is FinishReason.STOP:
            assert seq.output_ids[-1] == EOS_TOKEN_ID and not seq.params.ignore_eos


def test_cached_tokens_are_those_of_the_first_admission() -> None:
    scheduler = create_scheduler(num_blocks=8, block_size=4, max_num_seqs=2)
    a, b = create_requests(2, prompt_len=12, max_tokens=10, ignore_eos=True)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    assert b.num_cached_tokens == 0  # no other request shares its prompt
    while not scheduler.stats.num_preemptions:
        step(scheduler)
    while b.status is SeqStatus.WAITING:
        step(scheduler)
    assert b.num_cached_tokens == 0
