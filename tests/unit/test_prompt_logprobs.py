"""Prompt logprobs (engine/prompt_logprobs.py) against transformers' log-softmax on the same
weights (a tiny random Llama checkpoint, fp32), whole and in prefill chunks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import RequestError
from engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 17, 300, 42, 9, 1000, 7, 7, 7, 2000, 11, 12, 13, 14, 15, 16, 400, 401, 402]


@pytest.fixture(scope="module")
def reference(tiny_hf_checkpoint: Callable[[str], Path]) -> torch.Tensor:
    """transformers' log-softmax of every prompt position: [len(PROMPT), vocab]."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_hf_checkpoint("llama_gqa")), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("engine_kwargs", [{}, {"max_num_batched_tokens": 8}],
                         ids=["whole", "chunks_of_8"])
def test_prompt_logprobs_equal_transformers(tiny_engine: Callable[..., Any],
                                            reference: torch.Tensor,
                                            engine_kwargs: dict[str, Any]) -> None:
    engine = tiny_engine(**engine_kwargs)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    engine.generate([PROMPT[:4]], params)  # a cached prefix must not be used
    (seq,) = engine.generate([PROMPT], params)
    assert seq.num_cached_tokens == 0
    entries = seq.prompt_logprobs
    assert [e.token_id for e in entries] == PROMPT[1:]
    for p, e in enumerate(entries):
        row = reference[p]
        assert e.logprob == pytest.approx(row[PROMPT[p + 1]].item(), abs=1e-4)
        target = row[PROMPT[p + 1]]  # rank: exact up to ties within fp32 rounding
        assert int((row > target + 1e-4).sum()) < e.rank <= int((row > target - 1e-4).sum()) + 1
        values, ids = torch.topk(row, 3)
        assert [t for t, _ in e.top] == ids.tolist()
        assert [lp for _, lp in e.top] == pytest.approx(values.tolist(), abs=1e-4)
    engine.check_idle_integrity()


def test_outputs_carry_them_once_and_bad_values_fail(tiny_engine: Callable[..., Any]) -> None:
    engine = tiny_engine()
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=3, temperature=0.0,
                                                   prompt_logprobs=0, ignore_eos=True))
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    assert len(outputs[0].prompt_logprobs) == len(PROMPT) - 1
    assert all(not o.prompt_logprobs for o in outputs[1:])
    assert all(e.top == [] for e in outputs[0].prompt_logprobs)
    for bad in (-1, 21):
        with pytest.raises(RequestError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
