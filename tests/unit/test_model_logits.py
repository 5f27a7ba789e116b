"""Logits of our model equal transformers' on tiny random checkpoints (fp32: max abs diff < 1e-3).

Each checkpoint comes from the `tiny_hf_checkpoint` fixture (2 layers, hidden 64, random
weights). Two sequences go through our scheduler and ModelRunner with a 16-token step budget:
the prompts are prefilled in several chunks, the second prompt's chunks share steps with the
first one's decode steps, then both decode a few tokens (fed from a fixed token list instead
of sampled, so both sides see the same sequence). Every computed row's logits are compared
with one transformers forward pass over the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_runner import ScheduledSeq
from engine.sampler import SampleResult
from engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPT_LENS = (45, 23)
NUM_DECODE = 4
STEP_BUDGET = 16  # --max-num-batched-tokens: forces chunked prefill
FP32_TOL = 1e-3
VARIANTS = ("llama_gqa", "qwen2", "mha", "tied", "llama3_rope", "mistral", "sharded")


def _token_lists(vocab_size: int) -> list[list[int]]:
    """Per sequence: prompt + NUM_DECODE fed tokens + 1 (fed after the last computed step)."""
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab_size, (n + NUM_DECODE + 1,), generator=gen).tolist()
            for n in PROMPT_LENS]


def _engine(path: Path, dtype: str) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(
        model=str(path), dtype=dtype, kv_cache_memory="8MiB", max_model_len=128, block_size=8,
        max_num_batched_tokens=STEP_BUDGET, enable_prefix_caching=False), log_plan=False)


@torch.inference_mode()
def _our_logits(engine: LLMEngine, tokens: list[list[int]]) -> tuple[list[torch.Tensor], list[str]]:
    """Logits [len(seq) - 1, vocab] of every position, and each step's kind
    ("prefill"/"mixed"/"decode")."""
    runner, scheduler = engine.runner, engine.scheduler
    params = SamplingParams(max_tokens=NUM_DECODE + 1, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(f"seq{i}", t[:n], params)
            for i, (t, n) in enumerate(zip(tokens, PROMPT_LENS, strict=True))]
    index = {seq.seq_id: k for k, seq in enumerate(seqs)}
    out = [torch.full((len(t) - 1, engine.model_config.vocab_size), float("nan")) for t in tokens]
    kinds = []
    while scheduler.has_work:
        batch: list[ScheduledSeq] = scheduler.schedule()
        input_ids, positions, meta = runner.prepare(batch)
        logits = runner.model.compute_logits(
            runner.model(input_ids, positions, runner.kv_caches, meta)).float()  # [T, vocab]
        results = {}
        for i, s in enumerate(batch):
            k = index[s.seq.seq_id]
            start = s.seq.num_computed_tokens
            rows = logits[meta.query_start_loc[i]:meta.query_start_loc[i + 1]]
            out[k][start:start + s.num_tokens] = rows
            if s.completes:  # feed the next token of the fixed list instead of sampling
                results[s.seq.seq_id] = SampleResult(tokens[k][s.seq.num_tokens], None)
        num_decode = sum(s.num_tokens == 1 and s.seq.num_computed_tokens >= s.seq.num_prompt_tokens
                         for s in batch)
        kinds.append("decode" if num_decode == len(batch) else "mixed" if num_decode else "prefill")
        scheduler.postprocess(batch, results)
    for seq, t in zip(seqs, tokens, strict=True):
        assert seq.token_ids == t, "the engine did not take the fed tokens"
    engine.check_idle_integrity()
    return out, kinds


def _hf_model(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.inference_mode()
def _hf_logits(model: Any, tokens: list[list[int]]) -> list[torch.Tensor]:
    return [model(torch.tensor([t[:-1]])).logits[0].float() for t in tokens]


@pytest.fixture(scope="module")
def reference(tiny_hf_checkpoint: Callable[[str], Path]
              ) -> Callable[[str], tuple[list[list[int]], list[torch.Tensor]]]:
    """variant -> (token lists, transformers fp32 logits), computed once per module."""
    cache: dict[str, tuple[list[list[int]], list[torch.Tensor]]] = {}

    def get(variant: str) -> tuple[list[list[int]], list[torch.Tensor]]:
        if variant not in cache:
            path = tiny_hf_checkpoint(variant)
            model = _hf_model(path)
            tokens = _token_lists(model.config.vocab_size)
            cache[variant] = tokens, _hf_logits(model, tokens)
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_logits_match_transformers(variant: str, tiny_hf_checkpoint: Callable[[str], Path],
                                        reference: Callable[[str], Any]) -> None:
    tokens, ref = reference(variant)
    ours, kinds = _our_logits(_engine(tiny_hf_checkpoint(variant), "float32"), tokens)
    # The path under test really chunked the prefill and mixed it with decode steps.
    assert kinds.count("prefill") >= 2 and "mixed" in kinds and "decode" in kinds, kinds
    for i, (got, want) in enumerate(zip(ours, ref, strict=True)):
        assert torch.isfinite(got).all(), f"seq {i}: some positions were never computed"
        diff = (got - want).abs().max(dim=-1).values  # [positions]
        worst = int(diff.argmax())
        assert diff.max() < FP32_TOL, (
            f"{variant} seq {i}: max abs logit diff {diff.max():.2e} at position {worst} "
            f"(prompt {PROMPT_LENS[i]} tokens; "
            f"per-position: {[f'{d:.1e}' for d in diff.tolist()]})")


def test_tolerance_detects_position_errors(tiny_hf_checkpoint: Callable[[str], Path],
                                           reference: Callable[[str], Any]) -> None:
    """The 1e-3 bound is meaningful: wrong positions (every one doubled) move logits far more."""
    tokens, ref = reference("llama3_rope")
    model = _hf_model(tiny_hf_checkpoint("llama3_rope"))
    with torch.inference_mode():
        ids = torch.tensor([tokens[0][:-1]])
        wrong = model(ids, position_ids=2 * torch.arange(ids.shape[1])[None]).logits[0]
    assert (wrong - ref[0]).abs().max() > 10 * FP32_TOL


# Measured: bf16 ~9e-3, fp16 ~1.2e-3 max abs diff on logits of magnitude ~1.2; bounds leave ~4x.
@pytest.mark.parametrize(("variant", "dtype", "tol"), [
    ("llama_gqa", "bfloat16", 0.04), ("llama_gqa", "float16", 0.005),
    ("qwen2", "bfloat16", 0.04), ("llama3_rope", "float16", 0.005),
])
def test_half_precision_close_to_fp32_reference(variant: str, dtype: str, tol: float,
                                                tiny_hf_checkpoint: Callable[[str], Path],
                                                reference: Callable[[str], Any]) -> None:
    tokens, ref = reference(variant)
    engine = _engine(tiny_hf_checkpoint(variant), dtype)
    assert engine.plan.spec.dtype.value == dtype
    assert next(engine.runner.model.parameters()).dtype == getattr(torch, dtype)
    ours, _ = _our_logits(engine, tokens)
    for i, (got, want) in enumerate(zip(ours, ref, strict=True)):
        assert torch.isfinite(got).all(), f"{dtype} seq {i}: non-finite logits"
        diff = (got - want).abs().max()
        assert diff < tol, f"{variant} {dtype} seq {i}: max abs diff {diff:.3e} vs fp32 reference"
        top2 = want.topk(2, dim=-1).values  # [positions, 2]
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol  # positions whose best token is not a near-tie
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
