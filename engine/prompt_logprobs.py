"""Prompt logprobs (vLLM's `prompt_logprobs`, OpenAI's `echo` with `logprobs`): for every prompt
token after the first, its logprob given the tokens before it, its rank, and the top-n.

Computed on whichever worker prefills the prompt, chunk by chunk, from the hidden states the
prefill step computes anyway: the row of position p predicts token p + 1. Entries are appended
to `Sequence.prompt_logprobs` by position (entry e is token e + 1's), so a chunk computed twice
(after a preemption) adds nothing. A sequence that asks for them is never served from the
prefix cache (engine/kv_cache_manager.py): a cached token has no hidden state here.
"""

from __future__ import annotations

import torch

from engine.outputs import TokenLogprob
from engine.sequence import Sequence

ROWS_PER_PASS = 256  # logits rows at a time: [256, vocab] float32 stays small


def wants_prompt_logprobs(seq: Sequence, start: int, end: int) -> bool:
    """Whether a step computing positions [start, end) of `seq` adds prompt logprobs."""
    return (seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1
            and len(seq.prompt_logprobs) < seq.num_prompt_tokens - 1 and end > start)


def add_prompt_logprobs(compute_logits: torch.nn.Module | object, hidden: torch.Tensor,
                        rows: list[tuple[Sequence, int, int, int]]) -> None:
    """`rows`: (sequence, first row in `hidden`, start position, end position) of each sequence
    whose prompt chunk the step computed. hidden: [T, hidden_size]."""
    for seq, row0, start, end in rows:
        last = min(end, seq.num_prompt_tokens - 1)  # positions [start, last) predict a prompt token
        first = max(start, len(seq.prompt_logprobs))
        for lo in range(first, last, ROWS_PER_PASS):
            hi = min(lo + ROWS_PER_PASS, last)
            h = hidden[row0 + lo - start: row0 + hi - start]
            logits = compute_logits(h).float()  # type: ignore[operator]  # [R, vocab]
            targets = torch.tensor(seq.token_ids[lo + 1: hi + 1], dtype=torch.int64,
                                   device=logits.device)
            _append(seq, torch.log_softmax(logits, dim=-1), targets)


def _append(seq: Sequence, lp: torch.Tensor, targets: torch.Tensor) -> None:
    """lp: [R, vocab] log-probabilities; targets: [R] the tokens they predict."""
    top_n = seq.params.prompt_logprobs or 0
    chosen = lp.gather(1, targets[:, None])  # [R, 1]
    rank = (lp > chosen).sum(dim=-1, keepdim=True) + 1  # [R, 1]
    parts = [chosen.double(), rank.double()]
    if top_n:
        values, ids = torch.topk(lp, top_n, dim=-1)
        parts += [values.double(), ids.double()]
    table = torch.cat(parts, dim=1).tolist()
    for target, line in zip(targets.tolist(), table, strict=True):
        top = [(int(line[2 + top_n + j]), line[2 + j]) for j in range(top_n)]
        seq.prompt_logprobs.append(TokenLogprob(target, line[0], top, int(line[1])))
