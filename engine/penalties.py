"""Logit processing before sampling: `logit_bias`, repetition, frequency and presence penalties.

Applied to the whole batch on the logits' device, in this order (as vLLM v1 does: logits
processors, then penalties):
1. `logit_bias`: the value is added to the token's logit (OpenAI).
2. `repetition_penalty` r (vLLM / HF `RepetitionPenaltyLogitsProcessor`): for every token in the
   prompt or the output so far, a logit > 0 is divided by r, any other multiplied by r.
3. `frequency_penalty` f and `presence_penalty` p (OpenAI): over the output so far only,
   logit -= f * count(token) + p * (count(token) > 0).

The input is a sequence's own token ids (prompt + output so far) and its prompt length, so a
token sampled on a prefill worker, a decode worker (which holds the prompt and every output
token, the prefill worker's first one included) or after a preemption sees the same penalties.
Reported logprobs stay those of the raw distribution (engine/sampler.py).
"""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    token_ids: list[list[int]], num_prompt_tokens: list[int]) -> torch.Tensor:
    """logits: [N, vocab], one row per sequence (`token_ids[i]`: its prompt + output so far,
    the first `num_prompt_tokens[i]` the prompt). Returns float32 logits with the rows that
    asked for it processed (the input tensor itself when none did)."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    logits = logits.float().clone()
    dev, vocab = logits.device, logits.shape[-1]
    sel = [params[i] for i in rows]
    idx = _upload(rows, torch.int64, dev)
    sub = logits[idx]  # [R, V]
    sub = _add_bias(sub, sel, vocab)
    outputs = [token_ids[i][num_prompt_tokens[i]:] for i in rows]
    counts = _counts(outputs, vocab, dev)  # [R, V] float32: each token's count in the output
    if any(p.repetition_penalty != 1.0 for p in sel):
        prompts = [token_ids[i][:num_prompt_tokens[i]] for i in rows]
        seen = (_counts(prompts, vocab, dev) > 0) | (counts > 0)  # [R, V]
        rep = _upload([p.repetition_penalty for p in sel], torch.float32, dev)[:, None]
        factor = torch.where(seen, rep, torch.ones_like(rep))
        sub = torch.where(sub > 0, sub / factor, sub * factor)
    freq = _upload([p.frequency_penalty for p in sel], torch.float32, dev)[:, None]
    pres = _upload([p.presence_penalty for p in sel], torch.float32, dev)[:, None]
    sub = sub - freq * counts - pres * (counts > 0).float()
    logits[idx] = sub
    return logits


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _counts(seqs: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), vocab] float32: how often each token id occurs in each row's list."""
    flat = [r * vocab + t for r, ids in enumerate(seqs) for t in ids if 0 <= t < vocab]
    counts = torch.zeros(len(seqs) * vocab, dtype=torch.float32, device=device)
    if flat:
        index = _upload(flat, torch.int64, device)
        counts.index_add_(0, index, torch.ones(len(flat), dtype=torch.float32, device=device))
    return counts.view(len(seqs), vocab)


def _add_bias(sub: torch.Tensor, sel: list[SamplingParams], vocab: int) -> torch.Tensor:
    """Adds each row's `logit_bias` (ids are checked against the vocabulary at admission; one
    outside it is skipped here rather than indexing out of bounds)."""
    flat = [(r * vocab + t, b) for r, p in enumerate(sel) for t, b in p.logit_bias if t < vocab]
    if not flat:
        return sub
    index = _upload([f for f, _ in flat], torch.int64, sub.device)
    values = _upload([b for _, b in flat], torch.float32, sub.device)
    return sub.reshape(-1).index_add(0, index, values).view_as(sub)
