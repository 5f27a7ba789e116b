"""Co-run factors of this CPU: a step timed alone, then with another worker's loop on another
core (the planner's `CoRun`, `python -m bench.plan_validate --corun-factors LL,LH,HL,HH`).

    python -m bench.corun_probe [--core 0 --other-core 1] [--out F.json] [engine flags]

One torch thread per process, each pinned to its core, as `--cpu-affinity` pins workers. The
foreground times decode steps (one sequence at ~600 tokens of context: "light") and prefill
steps (a 512-token prompt: "heavy"), alone, then beside a background process that loops decode
steps of 4 sequences, then beside one that loops 512-token prefills. A factor is the median
step beside the loop over the median step alone. Workers on one CPU share its caches and memory
bandwidth; a profile times each step alone (`bench/step_overlap.py` shows the same in serving).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

LIGHT_CONTEXT, HEAVY_TOKENS = 600, 512


def _engine(engine_args: list[str], core: int) -> Any:
    import torch

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from worker.args import add_dataclass_args, dataclass_from_args

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    add_dataclass_args(p, EngineConfig)
    return LLMEngine.from_config(dataclass_from_args(EngineConfig, p.parse_args(engine_args)))


def _loop(kind: str, engine_args: list[str], core: int, ready: Any, stop: Any) -> None:
    """The background worker: decode steps of 4 sequences, or 512-token prefills, until told."""
    from engine.sampling_params import SamplingParams

    engine = _engine(engine_args, core)
    rng = random.Random(1)
    vocab = engine.model_config.vocab_size
    prompt = [rng.randrange(100, vocab) for _ in range(16)]
    ready.set()
    n = 0
    while not stop.is_set():
        if kind == "decode":
            if not engine.has_unfinished:
                for i in range(4):
                    engine.add_request(f"bg-{n}-{i}", prompt, SamplingParams(
                        max_tokens=1500, temperature=0.0, ignore_eos=True))
                n += 1
            engine.step()
        else:
            engine.generate([[rng.randrange(100, vocab) for _ in range(HEAVY_TOKENS)]],
                            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))


def _time_steps(engine: Any, repeats: int, rng: random.Random) -> dict[str, list[float]]:
    """Fresh random prompts each call: a prefix-cache hit would time no prefill at all."""
    from engine.sampling_params import SamplingParams

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, engine.model_config.vocab_size) for _ in range(n)]

    engine.step_log.clear()
    engine.generate([prompt(LIGHT_CONTEXT)], SamplingParams(
        max_tokens=repeats * 4 + 1, temperature=0.0, ignore_eos=True))
    light = [s.seconds for s in engine.step_log if s.num_decode_seqs and not s.num_prefill_tokens]
    heavy = []
    for _ in range(repeats):
        engine.step_log.clear()
        engine.generate([prompt(HEAVY_TOKENS)], SamplingParams(
            max_tokens=1, temperature=0.0, ignore_eos=True))
        heavy += [s.seconds for s in engine.step_log if s.num_prefill_tokens]
    return {"light": light, "heavy": heavy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.corun_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--other-core", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=8, help="prefill steps per condition")
    ap.add_argument("--out", type=Path, default=None)
    args, engine_args = ap.parse_known_args(argv)
    engine_args = engine_args or ["--kv-cache-memory", "256MiB", "--max-model-len", "2048"]
    if args.core == args.other_core or args.repeats < 2:
        ap.error("--core and --other-core must differ and --repeats be >= 2")
    engine = _engine(engine_args, args.core)
    rng = random.Random(0)
    _time_steps(engine, 2, rng)  # warm-up
    times = {"alone": _time_steps(engine, args.repeats, rng)}
    ctx = mp.get_context("spawn")
    for kind in ("decode", "prefill"):
        ready, stop = ctx.Event(), ctx.Event()
        bg = ctx.Process(target=_loop, args=(kind, engine_args, args.other_core, ready, stop),
                         daemon=True)
        bg.start()
        if not ready.wait(120):
            bg.kill()
            print("corun_probe: the background worker did not start", file=sys.stderr)
            return 1
        time.sleep(2.0)  # its loop is running
        times[f"beside {kind}"] = _time_steps(engine, args.repeats, rng)
        stop.set()
        bg.join(30)
        if bg.is_alive():
            bg.kill()
    med = {c: {k: statistics.median(v) for k, v in t.items()} for c, t in times.items()}
    factors = {"light_under_light": med["beside decode"]["light"] / med["alone"]["light"],
               "light_under_heavy": med["beside prefill"]["light"] / med["alone"]["light"],
               "heavy_under_light": med["beside decode"]["heavy"] / med["alone"]["heavy"],
               "heavy_under_heavy": med["beside prefill"]["heavy"] / med["alone"]["heavy"]}
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": "python -m bench.corun_probe " + " ".join(
               argv if argv is not None else sys.argv[1:]),
           "median_step_ms": {c: {k: round(v * 1e3, 2) for k, v in m.items()}
                              for c, m in med.items()},
           "factors": {k: round(v, 3) for k, v in factors.items()},
           "corun_factors_flag": ",".join(f"{v:.3f}" for v in factors.values())}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
