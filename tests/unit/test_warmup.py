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


def test_a_prompt_round_that_would_overrun_is_skipped_not_the_rounds_after_it(
        tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    """A clock that counts work (1 ms a prefill token, 2 ms a decoding sequence per step): the
    16- and 64-token rounds take 0.09 s; the 256-token round, scaled from the 64 one, would end
    past the 0.3 s budget, so it is skipped, and the decode-batch and mixed rounds still run
    (on a CPU the 1024-token round used to take the whole budget and more)."""
    cfg = EngineConfig(model=str(tiny_hf_checkpoint("llama_gqa")), kv_cache_memory="8MiB",
                       max_model_len=512, block_size=16, max_num_batched_tokens=512,
                       enable_prefix_caching=False)  # the second warm-up has the same prompts
    engine = LLMEngine.from_config(cfg, log_plan=False)

    def clock() -> float:
        return sum(s.num_prefill_tokens + 2 * s.num_decode_seqs for s in engine.step_log) / 1e3

    def prompt_rounds() -> list[int]:  # the one-prompt rounds' prefill steps
        return [s.num_prefill_tokens for s in engine.step_log
                if s.num_prefill_tokens and not s.num_decode_seqs
                and s.num_prefill_tokens not in (32 * DECODE_BATCH, 32 * (DECODE_BATCH - 1))]

    warm_up(engine, budget_s=0.3, clock=clock)
    assert prompt_rounds() == [16, 64]
    log = list(engine.step_log)
    assert any(s.num_decode_seqs == DECODE_BATCH and not s.num_prefill_tokens for s in log)
    assert [s.num_prefill_tokens for s in log if s.num_prefill_tokens and s.num_decode_seqs] \
        == [MIXED_CHUNK] * 4
    assert clock() < 0.6 and engine.cache.pool.num_used == 0  # the mixed round began at 0.28
    engine.step_log.clear()
    warm_up(engine, budget_s=60.0, clock=clock)
    assert prompt_rounds() == [16, 64, 256]


def test_the_planner_mirrors_the_budget_rule() -> None:
    """planner/warmup.py applies the same rule to the step model's times: given the time of the
    16-256 rounds and of the decode-batch round, it skips the 1024 round and keeps the rest."""
    from planner.profile import StepTimes
    from planner.warmup import warmup_steps
    from tests.unit.planner_fixtures import small_profile

    times = StepTimes(small_profile())
    every = warmup_steps(times, 512, 2000)
    # (seconds, prefill tokens, decoding sequences, context): the 1024 round starts after the
    # 256 round's 3 decode steps; the decode-batch round after the 1024 round's
    starts = [i for i, s in enumerate(every) if s[1] and not s[2] and s[3] in (512, 128)]
    assert [every[i][3] for i in starts] == [512, 128]
    first, batch = starts
    rounds_s = sum(s[0] for s in every[:first])
    batch_s = sum(s[0] for s in every[batch:batch + 8])
    planned = warmup_steps(times, 512, 2000, budget_s=rounds_s + batch_s)
    assert planned == every[:first] + every[batch:]  # only the 1024 round is left out
    assert warmup_steps(times, 512, 2000, budget_s=0.0) == every[:4]  # the 16 round only


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
