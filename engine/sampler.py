"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, top-n logprobs.

Logprobs are those of the model's raw distribution (before temperature/top-k/top-p), as
vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprob


@dataclass
class SampleResult:
    token_id: int
    logprob: TokenLogprob | None


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[SampleResult]:
    """logits: [N, vocab] float32, one row per sequence. Returns one result per row."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1).tolist()  # one host sync for the whole batch
    want_logprobs = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    results = []
    for i, p in enumerate(params):
        token = greedy[i] if p.is_greedy else _sample_row(logits[i], p, generators[i])
        lp = None
        if logprobs is not None and p.logprobs is not None:
            lp = _token_logprob(logprobs[i], token, p.logprobs)
        results.append(SampleResult(token, lp))
    return results


def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the best one always stays)
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(row, dim=-1)
    if gen is not None and gen.device != probs.device:
        probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _token_logprob(row: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if top_n > 0:
        values, ids = torch.topk(row, top_n)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(row[token]), top)
