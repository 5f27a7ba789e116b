"""Penalties, logit bias and prompt logprobs on CUDA equal the CPU computation (the batched
device path: pinned uploads, index_add on the GPU, bf16 logits in). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from engine.penalties import apply_penalties  # noqa: E402
from engine.prompt_logprobs import add_prompt_logprobs  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.sequence import Sequence  # noqa: E402

VOCAB = 49152


def _batch() -> tuple[list[SamplingParams], list[list[int]], list[int]]:
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (300, 5, 2000, 40)]
    params = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=0.2),
        SamplingParams(),
        SamplingParams(logit_bias=((0, 100.0), (VOCAB - 1, -100.0)), repetition_penalty=0.8),
        SamplingParams(frequency_penalty=-2.0, presence_penalty=2.0),
    ]
    return params, ids, [200, 5, 1000, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalties_on_cuda_equal_cpu(dtype: torch.dtype) -> None:
    params, ids, num_prompt = _batch()
    logits = torch.randn(len(ids), VOCAB, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = apply_penalties(logits.float(), params, ids, num_prompt)
    got = apply_penalties(logits.cuda(), params, ids, num_prompt)
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-5)


def test_prompt_logprobs_on_cuda_equal_cpu() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(64, VOCAB, bias=False)
    hidden = torch.randn(600, 64)
    prompt = torch.randint(0, VOCAB, (600,)).tolist()
    out = []
    for dev in ("cpu", "cuda"):
        seq = Sequence("s", list(prompt), SamplingParams(prompt_logprobs=5))
        add_prompt_logprobs(head.to(dev), hidden.to(dev), [(seq, 0, 0, 600)])
        out.append(seq.prompt_logprobs)
    cpu, cuda = out
    assert len(cpu) == len(cuda) == 599
    for a, b in zip(cpu, cuda, strict=True):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
        assert abs(a.rank - b.rank) <= 2  # fp32 near-ties may swap places
