"""The steps a worker's start-up warm-up reports, as the simulator's online cost models first see
them: the same rounds as worker/warmup.py (whose constants are mirrored here, the planner does
not import the worker), each step timed by the profile's step model.

Rounds (engine/llm_engine.py's step statistics: prefill tokens, decode sequences, and context
= each sequence's computed tokens plus the tokens of the step):
- one prompt of each of `PROMPT_LENGTHS` that fits, prefilled in the token budget, then 3
  decode steps of that one sequence (4 output tokens);
- `DECODE_BATCH` prompts of 32 tokens in one prefill step, then 7 decode steps of the batch;
- the mixed round: `DECODE_BATCH - 1` prompts of 32 tokens prefilled, then a `MIXED_PROMPT`
  -token prompt in `MIXED_CHUNK`-token chunks beside them as they decode, then one decode step
  of all of them.
"""

from __future__ import annotations

from collections.abc import Callable

from planner.profile import StepTimes
from planner.servers import Step

PROMPT_LENGTHS = (16, 64, 256, 1024)  # worker/warmup.py
DECODE_BATCH = 4
MIXED_PROMPT, MIXED_CHUNK = 128, 32


def warmup_room(max_model_len: int, kv_capacity_tokens: int) -> int:
    """The longest sequence the warm-up builds (worker/warmup.py): room for a batch of
    `DECODE_BATCH` plus one prompt in the KV cache, less 9 tokens."""
    return min(max_model_len, kv_capacity_tokens // (DECODE_BATCH + 1)) - 9


def warmup_steps(times: StepTimes, budget: int, room: int,
                 noise: Callable[[int], float] = lambda seqs: 1.0,
                 budget_s: float = float("inf")) -> list[Step]:
    """`room`: the longest sequence the warm-up may build (`warmup_room`); `budget_s`: the
    workers' `--warmup-s`, with worker/warmup.py's rule (a round starts only while time is
    left; a prompt round is skipped where the last one, scaled by length, says it would
    overrun), each round timed by the step model."""
    steps: list[Step] = []

    def step(prefill: int, token_context: float, seqs: int, decode_context: int,
             context: int) -> None:
        seconds = times.step_s(prefill, token_context, seqs, decode_context) * noise(seqs)
        steps.append((seconds, prefill, seqs, context))

    def elapsed() -> float:
        return sum(s[0] for s in steps)

    last: tuple[int, float] | None = None  # the last prompt round: (its length, its seconds)
    for n in PROMPT_LENGTHS:
        start = elapsed()
        if n > room or start > budget_s:
            continue
        if last is not None and start + last[1] * n / last[0] > budget_s:
            continue
        done = 0
        while done < n:
            chunk = min(budget, n - done)
            step(chunk, chunk * done, 0, 0, done + chunk)
            done += chunk
        for g in range(1, 4):
            step(0, 0.0, 1, n + g, n + g)
        last = (n, elapsed() - start)
    if elapsed() > budget_s:
        return steps
    batch = 32 * DECODE_BATCH
    step(batch, 0.0, 0, 0, batch)
    for g in range(1, 8):
        step(0, 0.0, DECODE_BATCH, DECODE_BATCH * (32 + g), DECODE_BATCH * (32 + g))
    if room >= MIXED_PROMPT + 8 and elapsed() <= budget_s:
        k = DECODE_BATCH - 1
        step(32 * k, 0.0, 0, 0, 32 * k)
        for i in range(MIXED_PROMPT // MIXED_CHUNK):
            g, done = i + 1, i * MIXED_CHUNK
            decode_context = k * (32 + g)
            step(MIXED_CHUNK, MIXED_CHUNK * done, k, decode_context,
                 decode_context + done + MIXED_CHUNK)
        g = MIXED_PROMPT // MIXED_CHUNK + 1
        context = k * (32 + g) + MIXED_PROMPT + 1
        step(0, 0.0, k + 1, context, context)
    return steps
