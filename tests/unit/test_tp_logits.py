"""Logits of a tensor-parallel engine (TP=2 and TP=4, real gloo process groups, one process
per rank) equal the TP=1 engine's within 1e-4 (fp32) on tiny random checkpoints: GQA with its
KV heads split (TP=2) and replicated (TP=4), MQA (one KV head, replicated; a vocabulary TP does
not divide, so the last rank's rows are padding), MHA, qkv bias (Qwen2), tied embeddings.

Two prompts go through rank 0's scheduler with a 16-token step budget (chunked prefill, then
prefill chunks beside decode steps, then decodes); each step's inputs travel to the other ranks
as the engine sends them, with every row's logits asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ConfigError, EngineConfig
from engine.errors import RequestError
from engine.llm_engine import LLMEngine
from engine.sampler import SampleResult
from engine.sampling_params import SamplingParams

PROMPT_LENS = (21, 12)
NUM_DECODE = 3
FP32_TOL = 1e-4
CASES = [("llama_gqa", 2), ("llama_gqa", 4), ("mqa", 2), ("mqa", 4), ("mha", 4), ("qwen2", 2),
         ("tied", 2)]


def _engine(path: Path, tp: int) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(
        model=str(path), dtype="float32", kv_cache_memory="2MiB", max_model_len=64, block_size=8,
        max_num_batched_tokens=16, enable_prefix_caching=False, tensor_parallel_size=tp,
        distributed_timeout=60.0), log_plan=False)


@torch.inference_mode()
def _all_logits(engine: LLMEngine, tokens: list[list[int]]) -> list[torch.Tensor]:
    """Logits [len(seq) - 1, vocab] of every position, computed the way the engine steps."""
    runner, scheduler = engine.runner, engine.scheduler
    params = SamplingParams(max_tokens=NUM_DECODE + 1, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(f"s{i}", t[:n], params)
            for i, (t, n) in enumerate(zip(tokens, PROMPT_LENS, strict=True))]
    index = {seq.seq_id: k for k, seq in enumerate(seqs)}
    out = [torch.full((len(t) - 1, engine.model_config.vocab_size), float("nan")) for t in tokens]
    while scheduler.has_work:
        batch = scheduler.schedule()
        inputs = runner.host_inputs(batch)
        inputs.logits_rows = np.arange(inputs.num_tokens, dtype=np.int64)  # every row
        if not runner.tp.is_single:
            runner.tp.broadcast_host(inputs.header())
            runner.tp.broadcast_host(inputs.payload())
        logits = runner.run_step(inputs)  # [T, vocab]
        results = {}
        for i, s in enumerate(batch):
            k, start = index[s.seq.seq_id], s.seq.num_computed_tokens
            rows = logits[int(inputs.query_start_loc[i]):int(inputs.query_start_loc[i + 1])]
            out[k][start:start + s.num_tokens] = rows
            if s.completes:
                results[s.seq.seq_id] = SampleResult(tokens[k][s.seq.num_tokens], None)
        scheduler.postprocess(batch, results)
    engine.check_idle_integrity()
    return out


@pytest.mark.parametrize(("variant", "tp"), CASES)
def test_tp_logits_equal_tp1(variant: str, tp: int,
                             tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    path = tiny_hf_checkpoint(variant)
    single = _engine(path, 1)
    gen = torch.Generator().manual_seed(7)
    tokens = [torch.randint(3, single.model_config.vocab_size, (n + NUM_DECODE + 1,),
                            generator=gen).tolist() for n in PROMPT_LENS]
    want = _all_logits(single, tokens)
    engine = _engine(path, tp)
    try:
        assert engine.plan.spec.tp_size == tp and len(engine.executor.procs) == tp - 1
        got = _all_logits(engine, tokens)
        with pytest.raises(RequestError, match="prompt_logprobs is not supported yet"):
            engine.add_request("pl", tokens[0][:4], SamplingParams(prompt_logprobs=1))
    finally:
        engine.close()
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.isfinite(g).all(), f"seq {i}: positions never computed"
        diff = float((g - w).abs().max())
        assert diff < FP32_TOL, f"{variant} TP={tp} seq {i}: max abs logit diff {diff:.2e}"


def test_tp_size_that_does_not_divide_heads_fails_before_spawning(
        tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    with pytest.raises(ConfigError, match=r"--tensor-parallel-size 3 does not divide the "
                                          r"model's 4 attention heads"):
        _engine(tiny_hf_checkpoint("llama_gqa"), 3)
