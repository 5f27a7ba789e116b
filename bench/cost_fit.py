"""How well the proxy's step-time cost model predicts a real engine's steps.

Runs a randomized continuous-batching workload through one engine (prompts of several lengths
arriving while others decode, so steps mix prefill chunks, decode batches and contexts), fits
`proxy.cost_model.StepCostModel` online to the first steps exactly as the proxy does from
heartbeats, and reports the error of its predictions on the held-out later steps, overall and
by kind of step (decode only, prefill only, mixed).

    python -m bench.cost_fit                                     # SmolLM2 on this CPU
    python -m bench.cost_fit --model /tmp/llama3-8b-shape --load-format dummy --device cuda

Writes a JSON and a Markdown table (with the command) to --out-dir (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.step_stats import StepStats
from proxy.cost_model import StepCostModel


def workload(engine: LLMEngine, num_requests: int, seed: int) -> list[StepStats]:
    """Requests with random prompt/output lengths arriving over the steps; every step's stats."""
    rng = random.Random(seed)
    room = engine.plan.max_model_len - 80
    vocab = engine.model_config.vocab_size
    lengths = [min(room, rng.choice([8, 32, 96, 200, 400, 800, 1500])) for _ in range(num_requests)]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    params = [SamplingParams(max_tokens=rng.randint(4, 64), temperature=0.0, ignore_eos=True)
              for _ in prompts]
    arrivals = sorted(rng.randint(0, 6 * num_requests) for _ in prompts)
    engine.step_log.clear()
    engine.generate(prompts, params, arrival_steps=arrivals)
    return list(engine.step_log)


def kind(s: StepStats) -> str:
    if s.num_prefill_tokens and s.num_decode_seqs:
        return "mixed"
    return "prefill" if s.num_prefill_tokens else "decode"


def evaluate(steps: list[StepStats], fit_fraction: float) -> dict[str, Any]:
    split = int(len(steps) * fit_fraction)
    model = StepCostModel()
    for s in steps[:split]:
        model.observe(s.seconds, s.num_prefill_tokens, s.num_decode_seqs, s.num_context_tokens)
    rows: dict[str, list[float]] = {"all": [], "decode": [], "prefill": [], "mixed": []}
    for s in steps[split:]:
        predicted = model.predict(s.num_prefill_tokens, s.num_decode_seqs, s.num_context_tokens)
        err = 100.0 * (predicted - s.seconds) / s.seconds
        rows["all"].append(err)
        rows[kind(s)].append(err)
    summary = {k: _stats(v) for k, v in rows.items() if v}
    return {"num_fit_steps": split, "num_test_steps": len(steps) - split,
            "coefficients": asdict(model.coefficients), "error_pct": summary}


def _stats(errors: list[float]) -> dict[str, float]:
    absolute = sorted(abs(e) for e in errors)
    return {"n": len(errors), "median_abs": statistics.median(absolute),
            "p90_abs": absolute[max(0, math.ceil(0.9 * len(absolute)) - 1)],
            "mean_signed": statistics.fmean(errors)}


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Cost-model fit: {doc['model']} on {doc['device_name']} ({doc['date']})", "",
             f"`{doc['command']}`", "",
             f"Fitted online on {doc['result']['num_fit_steps']} steps, tested on the next "
             f"{doc['result']['num_test_steps']} (prediction minus measured, % of measured).", "",
             "| steps | n | median abs error % | p90 abs error % | mean signed % |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, s in doc["result"]["error_pct"].items():
        lines.append(f"| {name} | {s['n']} | {s['median_abs']:.1f} | {s['p90_abs']:.1f} | "
                     f"{s['mean_signed']:+.1f} |")
    coef = doc["result"]["coefficients"]
    lines += ["", "Fitted: " + ", ".join(f"{k} = {v:.3g}" for k, v in coef.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV budget (default: 1GiB on CPU, --gpu-memory-utilization on CUDA)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--fit-fraction", type=float, default=0.6)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--tag", default="", help="Result file name part (default: device kind)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kv_memory = args.kv_cache_memory or ("1GiB" if args.device == "cpu" else None)
    config = EngineConfig(model=args.model, load_format=args.load_format, device=args.device,
                          max_model_len=args.max_model_len, kv_cache_memory=kv_memory)
    engine = LLMEngine.from_config(config)
    workload(engine, args.requests, args.seed + 1)  # warm-up: every kernel shape compiles
    t0 = time.perf_counter()
    steps = workload(engine, args.requests, args.seed)
    result = evaluate(steps, args.fit_fraction)
    device_name = (torch.cuda.get_device_name() if config.torch_device.type == "cuda"
                   else f"{platform.processor() or platform.machine()} CPU, "
                        f"{args.threads} thread(s)")
    doc = {"command": "python -m bench.cost_fit " + " ".join(argv or sys.argv[1:]),
           "model": args.model, "device_name": device_name,
           "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1),
           "num_steps": len(steps), "result": result,
           # raw, to refit other model forms offline: seconds, prefill tokens, decode seqs, context
           "steps": [[s.seconds, s.num_prefill_tokens, s.num_decode_seqs, s.num_context_tokens]
                     for s in steps]}
    text = markdown(doc)
    print(text)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or config.torch_device.type
    stem = out / f"cost_fit_{tag}_{doc['date']}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
