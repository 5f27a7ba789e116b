"""Chunked prefill with cached context on the engine itself: a 1024-token prompt in chunks of
256 / 128 / 64, run twice with different tokens (the second run meets only shapes the first
compiled), and a prefix-cache hit, each step's time printed. Says whether the slow steps of
issue 15's H100 profile are first-run costs (compiling) or steady ones.

    python -m bench.chunk_context_probe --model DIR --load-format dummy [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def run(engine: LLMEngine, prompt: list[int], chunk: int) -> list[list[float]]:
    engine.step_log.clear()
    engine.add_request(f"probe-{random.random()}", prompt, SamplingParams(
        max_tokens=1, temperature=0.0, ignore_eos=True), prefill_chunk=chunk)
    while engine.has_unfinished:
        engine.step()
    return [[s.num_prefill_tokens, s.num_context_tokens - s.num_prefill_tokens,
             round(s.seconds * 1e3, 2)] for s in engine.step_log]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chunk_context_probe", description=__doc__)
    p.add_argument("--model", default=None, help="Default: the default model (SmolLM2).")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    model = {"model": args.model} if args.model else {}
    engine = LLMEngine.from_config(EngineConfig(
        **model, load_format=args.load_format, device=args.device,
        max_model_len=4096, kv_cache_memory="8GiB"), log_plan=False)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    doc: dict[str, list] = {}
    for rep in (1, 2):
        for chunk in (256, 128, 64):
            steps = run(engine, prompt(1024), chunk)
            doc[f"run{rep}_chunk{chunk}"] = steps
            print(f"run {rep} chunk {chunk}: ms per step "
                  f"{[s[2] for s in steps]} (context {[s[1] for s in steps]})", flush=True)
    prefix = prompt(768)
    run(engine, prefix, 0)
    for rep in (1, 2):
        steps = run(engine, prefix + prompt(256), 0)
        doc[f"hit{rep}"] = steps
        print(f"prefix hit 768 + 256, run {rep}: {steps}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
