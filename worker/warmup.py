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

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PROMPT_LENGTHS = (16, 64, 256, 1024)
DECODE_BATCH = 4
MIXED_PROMPT, MIXED_CHUNK = 128, 32  # the mixed round's prompt, prefilled in 4 capped chunks


def warm_up(engine: LLMEngine, budget_s: float = 5.0) -> int:
    """Run the warm-up within about `budget_s` seconds; the number of steps it recorded."""
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    room = min(engine.plan.max_model_len, engine.cache.pool.num_blocks
               * engine.cache.block_size // (DECODE_BATCH + 1)) - 9
    before = len(engine.step_log)
    t0 = time.perf_counter()
    rounds = [[n] for n in PROMPT_LENGTHS if n <= room] + [[32] * DECODE_BATCH]
    for lengths in rounds:
        if time.perf_counter() - t0 > budget_s:
            break
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths if n <= room]
        if prompts:
            # one prompt: prefill chunks; a batch: decode steps of several sequences
            max_tokens = 4 if len(prompts) == 1 else 8
            engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                    ignore_eos=True))
    if time.perf_counter() - t0 <= budget_s and room >= MIXED_PROMPT + 8:
        _mixed_round(engine, rng, vocab)
    steps = len(engine.step_log) - before
    log.info("warm-up: %d steps in %.2f s", steps, time.perf_counter() - t0)
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
