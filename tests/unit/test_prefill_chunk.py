"""A sequence's `prefill_chunk` caps the prompt tokens of every step it prefills in (the decode
worker's local prefills, placed by the proxy beside a running batch); with no cap a prompt
takes the whole token budget. Scheduler only, no model: sampled tokens are faked."""

from __future__ import annotations

from engine.kv_cache_manager import KvCacheManager
from engine.sampler import SampleResult
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence

PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


def scheduler(budget: int = 256) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                                     max_model_len=2048), KvCacheManager(512, 16, False))


def run_step(s: Scheduler) -> dict[str, int]:
    """One step: tokens per sequence; every sequence that completes gets token 7."""
    batch = s.schedule()
    results = {b.seq.seq_id: SampleResult(7, None) for b in batch if b.completes}
    s.postprocess(batch, results)
    return {b.seq.seq_id: b.num_tokens for b in batch}


def test_capped_prefill_runs_in_chunks_beside_a_decoding_sequence() -> None:
    s = scheduler()
    s.add(Sequence("dec", list(range(10)), PARAMS))
    run_step(s)  # "dec" prefilled, now decoding
    s.add(Sequence("local", list(range(100)), PARAMS, prefill_chunk=32))
    steps = [run_step(s) for _ in range(4)]
    assert [st["local"] for st in steps] == [32, 32, 32, 4]
    assert all(st["dec"] == 1 for st in steps[:3])  # the running sequence decodes every step


def test_without_a_cap_the_prompt_takes_the_whole_budget() -> None:
    s = scheduler(budget=64)
    s.add(Sequence("p", list(range(100)), PARAMS))
    assert run_step(s) == {"p": 64}
    assert run_step(s) == {"p": 36}


def test_the_smallest_cap_in_a_step_bounds_its_prefill_total() -> None:
    s = scheduler()
    s.add(Sequence("a", list(range(200)), PARAMS, prefill_chunk=48))
    s.add(Sequence("b", list(range(200)), PARAMS, prefill_chunk=16))
    s.add(Sequence("c", list(range(200)), PARAMS))  # uncapped, but shares steps with a and b
    for _ in range(6):
        step = run_step(s)
        prefill = sum(n for n in step.values() if n > 1)
        assert prefill <= 48
        if "b" in step:
            assert prefill <= 16


def test_a_cap_never_stalls_a_sequence_for_good() -> None:
    s = scheduler()
    s.add(Sequence("big", list(range(300)), PARAMS))
    s.add(Sequence("capped", list(range(40)), PARAMS, prefill_chunk=16))
    for _ in range(60):
        run_step(s)
        if not s.has_work:
            break
    assert not s.has_work, "a capped prefill never finished"
    assert s.cache.pool.num_used == 0
