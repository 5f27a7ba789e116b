"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, top-n logprobs.

Logprobs are those of the model's raw distribution (before temperature/top-k/top-p), as
vLLM reports them by default.

The whole batch is sampled on the logits' device, and the host reads the tokens back once
(`.tolist()`, the step's one wait for the GPU), plus once more when a request asked for
logprobs. Rows without a seed draw together (exponential race: argmax(p / E), E ~ Exp(1), is
a draw from p); a request with a seed draws alone from a CPU generator seeded from (seed,
output index) (`Sequence.generator`), so its tokens do not depend on the batch it shares, the
device, or which worker drew the previous token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.grammar_runtime import apply_bitmask
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_id: int
    logprob: TokenLogprob | None


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None],
           raw_logits: torch.Tensor | None = None,
           bitmask: torch.Tensor | None = None) -> list[SampleResult]:
    """logits: [N, vocab] float32, one row per sequence, as processed (engine/penalties.py);
    `raw_logits` the model's own, which logprobs report (default: `logits`). Returns one
    result per row. bitmask: [N, ceil(vocab / 32)] int32 allowed tokens of guided rows
    (engine/grammar_runtime.py), applied on the logits' device before any choice."""
    logits = logits.float()
    scores = logits if bitmask is None else apply_bitmask(logits, bitmask)
    tokens = scores.argmax(dim=-1)  # [N]
    batched = [i for i, p in enumerate(params) if not p.is_greedy and generators[i] is None]
    if batched:
        idx = _to_device(batched, torch.int64, logits.device)
        tokens[idx] = _sample_rows(scores[idx], [params[i] for i in batched])
    for i, p in enumerate(params):
        if not p.is_greedy and generators[i] is not None:
            tokens[i] = _sample_row_seeded(scores[i], p, generators[i])
    token_ids = tokens.tolist()  # one host sync for the whole batch
    logprobs = _logprobs(logits if raw_logits is None else raw_logits.float(), tokens, token_ids,
                         params)
    return [SampleResult(t, lp) for t, lp in zip(token_ids, logprobs, strict=True)]


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device` without waiting for the GPU (pinned, non-blocking copy)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _filtered(rows: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
              top_p: torch.Tensor, need_sort: bool) -> torch.Tensor:
    """Scaled logits with everything outside top-k, then outside top-p, at -inf. rows: [N, V]."""
    rows = rows / temperature[:, None]
    if not need_sort:
        return rows
    sorted_logits, order = torch.sort(rows, dim=-1, descending=True)
    rank = torch.arange(rows.shape[-1], device=rows.device)
    sorted_logits = sorted_logits.masked_fill(
        (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None]), float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the mass before it already reaches top_p (the best one always stays)
    drop = probs.cumsum(-1) - probs >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(rows, float("-inf")).scatter(1, order, sorted_logits)


def _sample_rows(rows: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """One draw per row with the global RNG, all rows at once. rows: [N, V] -> [N] int64."""
    vocab = rows.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p for p in params]
    need_sort = any(top_k) or any(tp < 1.0 for tp in top_p)
    dev = rows.device
    filtered = _filtered(rows, _to_device([p.temperature for p in params], torch.float32, dev),
                         _to_device(top_k, torch.int64, dev), _to_device(top_p, torch.float32, dev),
                         need_sort)
    probs = torch.softmax(filtered, dim=-1)
    race = torch.empty_like(probs).exponential_()
    return (probs / race).argmax(dim=-1)


def _sample_row_seeded(row: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(row, dim=-1)
    if gen.device != probs.device:
        probs = probs.cpu()
    return torch.multinomial(probs, 1, generator=gen)[0].to(row.device)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, token_ids: list[int],
              params: list[SamplingParams]) -> list[TokenLogprob | None]:
    """Logprob of each sampled token and the top-n, read back in one transfer."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return [None] * len(params)
    top_n = max(params[i].logprobs or 0 for i in rows)
    idx = _to_device(rows, torch.int64, logits.device)
    lp = torch.log_softmax(logits[idx], dim=-1)  # [R, V]
    chosen = lp.gather(1, tokens[idx, None])  # [R, 1]
    parts = [chosen.double()]
    if top_n:
        values, ids = torch.topk(lp, top_n, dim=-1)
        parts += [values.double(), ids.double()]  # ids < 2**53: exact in float64
    table = torch.cat(parts, dim=1).tolist()
    out: list[TokenLogprob | None] = [None] * len(params)
    for r, i in enumerate(rows):
        n = params[i].logprobs or 0
        line = table[r]
        top = [(int(line[1 + top_n + j]), line[1 + j]) for j in range(n)]
        out[i] = TokenLogprob(token_ids[i], line[0], top)
    return out
