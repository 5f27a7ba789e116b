"""The worker's start-up warm-up runs every kind of step serving makes (prefill, decode batch,
and mixed steps: capped chunks with context beside a decoding batch), within its budget, and
leaves no block used."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from worker.warmup import DECODE_BATCH, MIXED_CHUNK, warm_up


def test_warm_up_covers_prefill_decode_and_mixed_steps(
        tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    cfg = EngineConfig(model=str(tiny_hf_checkpoint("llama_gqa")), kv_cache_memory="8MiB",
                       max_model_len=512, block_size=16, max_num_batched_tokens=512)
    engine = LLMEngine.from_config(cfg, log_plan=False)
    steps = warm_up(engine, budget_s=60.0)
    log = list(engine.step_log)
    assert steps == len(log) > 0
    assert any(s.num_prefill_tokens >= 256 and not s.num_decode_seqs for s in log)
    assert any(s.num_decode_seqs == DECODE_BATCH and not s.num_prefill_tokens for s in log)
    mixed = [s for s in log if s.num_prefill_tokens and s.num_decode_seqs]
    # the prompt's 4 chunks beside the 3 decoding sequences, the later ones after context
    assert [s.num_prefill_tokens for s in mixed] == [MIXED_CHUNK] * 4
    assert all(s.num_decode_seqs == DECODE_BATCH - 1 for s in mixed)
    assert not engine.has_unfinished and engine.cache.pool.num_used == 0
    engine.check_idle_integrity()


def test_warm_up_stops_at_its_budget(tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    cfg = EngineConfig(model=str(tiny_hf_checkpoint("llama_gqa")), kv_cache_memory="8MiB",
                       max_model_len=512, block_size=16, max_num_batched_tokens=512)
    engine = LLMEngine.from_config(cfg, log_plan=False)
    assert warm_up(engine, budget_s=0.0) == 0  # no time: no round, the mixed one neither
    assert not engine.step_log and engine.cache.pool.num_used == 0


def test_the_planners_warm_up_steps_are_the_workers(
        tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    """planner/warmup.py mirrors this warm-up for the simulator's online cost models (the
    planner imports no torch): the same steps, each with the same prefill tokens, decode
    sequences and context as the engine reports them."""
    from planner.profile import StepTimes
    from planner.warmup import warmup_room, warmup_steps
    from tests.unit.planner_fixtures import small_profile

    cfg = EngineConfig(model=str(tiny_hf_checkpoint("llama_gqa")), kv_cache_memory="8MiB",
                       max_model_len=512, block_size=16, max_num_batched_tokens=200)
    engine = LLMEngine.from_config(cfg, log_plan=False)
    warm_up(engine, budget_s=60.0)
    room = warmup_room(engine.plan.max_model_len,
                       engine.cache.pool.num_blocks * engine.cache.block_size)
    engine_steps = [(s.num_prefill_tokens, s.num_decode_seqs, s.num_context_tokens)
                    for s in engine.step_log]
    planned = [(p, d, c) for _, p, d, c in warmup_steps(StepTimes(small_profile()), 200, room)]
    assert planned == engine_steps
