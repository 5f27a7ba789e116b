"""Out of blocks mid-generation: the scheduler preempts (recompute) instead of failing, counters
never go negative, outputs equal an unconstrained run, and every block comes back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def test_preemption_keeps_outputs_and_frees_blocks(
        tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    path = str(tiny_hf_checkpoint("llama_gqa"))
    prompts = [[i + 1] * (5 + 3 * i) for i in range(8)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    def run(kv_bytes: str) -> tuple[list[list[int]], LLMEngine]:
        cfg = EngineConfig(model=path, kv_cache_memory=kv_bytes, max_model_len=64, block_size=8)
        engine = LLMEngine.from_config(cfg, log_plan=False)
        return [s.output_ids for s in engine.generate(prompts, params)], engine

    roomy, _ = run("4MiB")
    # 2 layers x 2 kv heads x 16 dim x 2 x 4 bytes = 512 B/token: 64 KiB = 16 blocks of 8 tokens,
    # while 8 sequences of up to 61 tokens need up to 64 blocks at once.
    tight, engine = run("64KiB")
    assert engine.cache.pool.num_blocks == 16
    assert engine.scheduler.stats.num_preemptions > 0
    assert tight == roomy
    assert engine.cache.pool.num_used == 0
    engine.check_idle_integrity()
