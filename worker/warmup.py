"""Start-up warm-up: a few synthetic requests through the worker's own engine, so its first
heartbeats already carry step timings of prefill chunks of several sizes, of decode batches and
of mixed steps (the proxy fits its placement cost models to them) and the first real requests
do not pay for lazy initialisation. The last round is the kind of step serving makes and single
requests never do: a prompt prefilled in capped chunks (each after the last one's context)
beside a batch that decodes, as a local prefill runs on a busy decode worker; on CUDA those
steps run eagerly (no CUDA graph), so their kernels are first built here, not under the first
busy traffic. Bounded in time; leaves no block used."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PROMPT_LENGTHS = (16, 64, 256, 1024)
DECODE_BATCH = 4
MIXED_PROMPT, MIXED_CHUNK = 128, 32  # the mixed round's prompt, prefilled in 4 capped chunks


def warm_up(engine: LLMEngine, budget_s: float = 5.0,
            clock: Callable[[], float] = time.perf_counter) -> int:
    """Run the warm-up within about `budget_s` seconds; the number of steps it recorded.

    A round starts only while time is left. A prompt round (1 sequence) is also skipped when
    the last one, scaled by prompt length, says it would end past the budget: on a CPU the
    1024-token round alone takes longer than the default budget, and it used to crowd out the
    decode-batch and mixed rounds (planner/warmup.py mirrors this rule)."""
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    room = min(engine.plan.max_model_len, engine.cache.pool.num_blocks
               * engine.cache.block_size // (DECODE_BATCH + 1)) - 9
    before = len(engine.step_log)
    t0 = clock()
    last: tuple[int, float] | None = None  # the last prompt round: (its length, its seconds)
    rounds = [[n] for n in PROMPT_LENGTHS if n <= room] + [[32] * DECODE_BATCH]
    for lengths in rounds:
        start = clock()
        if start - t0 > budget_s:
            break
        if len(lengths) == 1 and last is not None and (
                start - t0 + last[1] * lengths[0] / last[0] > budget_s):
            continue  # it would overrun (a longer one would too; the decode batch may not)
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths if n <= room]
        if not prompts:
            continue
        # one prompt: prefill chunks; a batch: decode steps of several sequences
        max_tokens = 4 if len(prompts) == 1 else 8
        engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                ignore_eos=True))
        if len(lengths) == 1:
            last = (lengths[0], clock() - start)
    if clock() - t0 <= budget_s and room >= MIXED_PROMPT + 8:
        _mixed_round(engine, rng, vocab)
    steps = len(engine.step_log) - before
    log.info("warm-up: %d steps in %.2f s", steps, clock() - t0)
    return steps


def _mixed_round(engine: LLMEngine, rng: random.Random, vocab: int) -> None:
    """A batch decodes while a prompt joins it in capped chunks: mixed steps, with context."""
    decode = SamplingParams(max_tokens=MIXED_PROMPT // MIXED_CHUNK + 2, temperature=0.0,
                            ignore_eos=True)
    for i in range(DECODE_BATCH - 1):
        engine.add_request(f"warmup-mixed-{i}", [rng.randrange(vocab) for _ in range(32)],
                           decode)
    engine.step()  # their prefill; from the next step on they decode
    engine.add_request("warmup-mixed-prompt", [rng.randrange(vocab) for _ in range(MIXED_PROMPT)],
                       SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                       prefill_chunk=MIXED_CHUNK)
    while engine.has_unfinished:
        engine.step()
