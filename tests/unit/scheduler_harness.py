"""The scheduler tests' harness, with no model (vLLM's `tests/v1/core` style); used by
test_scheduler.py and test_scheduler_kv_blocks.py.

`create_scheduler(...)` builds a Scheduler on a KvCacheManager of `num_blocks` blocks;
`create_requests(...)` makes sequences; `step(...)` schedules, feeds fake `SampleResult`s (one
for every sequence whose step completes its tokens) to `postprocess`, and checks the block
accounting after `schedule` and after `postprocess`: the pool is consistent, free + used ==
total, every block's reference count equals the number of block tables that hold it, and a
waiting sequence holds no block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from engine.kv_cache_manager import KvCacheManager
from engine.model_runner import ScheduledSeq
from engine.sampler import SampleResult
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import SeqStatus, Sequence

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
