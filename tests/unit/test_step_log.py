"""The engine's record of its steps: each step's time and what it held (the placement cost
models' input), and at DEBUG one log line per step (how a serving run's prefill time
is read from its logs, e.g. `bench.crossnode --server-log-level debug`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def test_prefill_steps_are_recorded_and_logged(tiny_hf_checkpoint: Callable[[str], Path],
                                                caplog: pytest.LogCaptureFixture) -> None:
    cfg = EngineConfig(model=str(tiny_hf_checkpoint("llama_gqa")), kv_cache_memory="4MiB",
                       max_model_len=128, block_size=8, max_num_batched_tokens=16)
    engine = LLMEngine.from_config(cfg, log_plan=False)
    caplog.set_level(logging.DEBUG, logger="engine.llm_engine")
    engine.generate([list(range(1, 41))], SamplingParams(max_tokens=3, temperature=0.0,
                                                         ignore_eos=True))
    steps = list(engine.step_log)
    assert [s.num_prefill_tokens for s in steps] == [16, 16, 8, 0, 0]  # 40 tokens in 16s
    assert [s.num_decode_seqs for s in steps] == [0, 0, 0, 1, 1]
    assert [s.num_context_tokens for s in steps] == [16, 32, 40, 41, 42]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 5
    assert lines[1].endswith(": 16 prefill tokens in 1 prompts (token context 256), "
                             "0 decoding over 0 context tokens")
    assert lines[3].endswith(": 0 prefill tokens in 0 prompts (token context 0), "
                             "1 decoding over 41 context tokens")
