"""Tensor parallelism on the real default model (SmolLM2-135M: 9 heads, 3 KV heads) with TP=3,
one process per rank over gloo on CPU.

- greedy tokens of a TP=3 engine equal the TP=1 engine's on a small varied prompt set, as one
  continuous batch;
- `pdserve generate -tp 3` prints what TP=1 generates;
- kill -9 of one rank mid-generation: `pdserve generate` exits with a clear error naming the
  tensor-parallel failure, and the other rank exits too, within a bound;
- `-tp 2` (does not divide 9 heads) fails at start-up naming the flag and the numbers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from serving import assert_exits

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

NUM_NEW_TOKENS = 12
KV = ["--kv-cache-memory", "32MiB", "--max-model-len", "512"]
TEXTS = ["The capital of France is", "1, 1, 2, 3, 5, 8, 13,",
         "北京是中国的首都，也是一座历史悠久的城市。上海是"]
CHAT = "What is the capital of Japan?"
PIDS_RE = re.compile(r"started ranks 1\.\.\d+ \(pids \[([\d, ]+)\]")
KILL_BOUND_S = 90.0
ENGINE: dict[str, Any] = dict(kv_cache_memory="32MiB", max_model_len=512,
                              max_num_batched_tokens=32, distributed_timeout=60.0)


def _engine(tp: int) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(**ENGINE, tensor_parallel_size=tp), log_plan=False)


def _prompts(engine: LLMEngine) -> list[list[int]]:
    tok = engine.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": CHAT}])
    return [tok.encode(t) for t in [*TEXTS, chat]]


def _greedy(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return [s.output_ids for s in engine.generate(_prompts(engine), params)]


@pytest.fixture(scope="module")
def tp1(smollm2_engine: Callable[..., LLMEngine]) -> Iterator[tuple[LLMEngine, list[list[int]]]]:
    """`_engine(1)`, built on the session's SmolLM2 checkpoint (tests/conftest.py)."""
    engine = smollm2_engine(**ENGINE)
    yield engine, _greedy(engine)


def test_tp3_greedy_tokens_equal_tp1(tp1: tuple[LLMEngine, list[list[int]]]) -> None:
    _, want = tp1
    engine = _engine(3)
    try:
        assert engine.plan.spec.num_kv_heads == 1 and engine.plan.spec.tp_size == 3
        got = _greedy(engine)
    finally:
        engine.close()
    assert got == want


def _pdserve(*args: str, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deploy.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_generate_cli_tp3_prints_tp1_output(tp1: tuple[LLMEngine, list[list[int]]]) -> None:
    engine, want = tp1
    proc = _pdserve("generate", "-tp", "3", *KV, "--prompt", TEXTS[0], "--max-tokens",
                    str(NUM_NEW_TOKENS), "--ignore-eos")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "KV cache per rank (each of 3 TP ranks holds 1 of 3 KV heads" in err
    assert out.rstrip("\n") == engine.tokenizer.decode(want[0])


def test_killed_rank_fails_generate_cleanly() -> None:
    proc = _pdserve("generate", "-tp", "3", *KV, "--distributed-timeout", "30", "--prompt",
                    "Once upon a time", "--max-tokens", "400", "--ignore-eos")
    try:
        lines: list[str] = []
        pids: list[int] = []
        assert proc.stderr is not None
        for line in proc.stderr:  # until the engine has loaded: generation runs from here
            lines.append(line)
            if m := PIDS_RE.search(line):
                pids = [int(p) for p in m.group(1).split(",")]
            if "loaded smollm2" in line:
                break
        assert len(pids) == 2, "".join(lines)
        time.sleep(1.0)
        os.kill(pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=KILL_BOUND_S)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err[-2000:]
    assert re.search(r"error: tensor-parallel .* failed on rank 0 of 3", err), err[-2000:]
    assert elapsed < KILL_BOUND_S
    assert_exits(pids[1], 30, "the surviving rank")


def test_tp_size_that_does_not_divide_heads_fails_at_start() -> None:
    proc = _pdserve("generate", "--tensor-parallel-size", "2", "--prompt", "hi")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "--tensor-parallel-size 2 does not divide the model's 9 attention heads" in err
    assert "started ranks" not in err  # refused before any rank was spawned
