"""How well the proxy's step-time cost model predicts a real engine's steps.

Runs a randomized continuous-batching workload through one engine (prompts of several lengths
arriving while others decode, so steps mix prefill chunks, decode batches and contexts), fits
`proxy.cost_model.StepCostModel` online to the first steps exactly as the proxy does from
heartbeats, and reports the error of its predictions on the held-out later steps, overall and
by kind of step (decode only, prefill only, mixed).

    python -m bench.cost_fit                                     # SmolLM2 on this CPU
    python -m bench.cost_fit --model /tmp/llama3-8b-shape --load-format dummy --device cuda
    python -m bench.cost_fit --from-json bench/results/cost_fit_X_DATE.json   # no engine

Writes a JSON (with every step's raw timing) and a Markdown table (with the command) to
--out-dir (default bench/results). `--from-json` re-evaluates a saved run's raw steps with the
current model (same fit/test split, the saved result beside it as "before"), so model forms
can be compared offline; it writes `<source name>_refit_<date>`.
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
from typing import TYPE_CHECKING, Any

from proxy.cost_model import StepCostModel

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.step_stats import StepStats

Step = tuple[float, int, int, int]  # seconds, prefill tokens, decode seqs, context tokens


def workload(engine: LLMEngine, num_requests: int, seed: int) -> list[StepStats]:
    """Requests with random prompt/output lengths arriving over the steps; every step's stats."""
    from engine.sampling_params import SamplingParams

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


def kind(prefill_tokens: int, decode_seqs: int) -> str:
    if prefill_tokens and decode_seqs:
        return "mixed"
    return "prefill" if prefill_tokens else "decode"


def evaluate(steps: list[Step], fit_fraction: float) -> dict[str, Any]:
    """Fit on the first `fit_fraction` of the steps (as heartbeats would feed the proxy), then
    the error of each later step's prediction, in % of the measured time."""
    split = int(len(steps) * fit_fraction)
    model = StepCostModel()
    for step in steps[:split]:
        model.observe(*step)
    t0 = time.perf_counter()
    coefficients = model.coefficients
    fit_ms = 1e3 * (time.perf_counter() - t0)
    rows: dict[str, list[float]] = {"all": [], "decode": [], "prefill": [], "mixed": []}
    mixes: dict[str, list[tuple[float, float]]] = {}
    for seconds, prefill, seqs, context in steps[split:]:
        predicted = coefficients.step_seconds(prefill, seqs, context)
        err = 100.0 * (predicted - seconds) / seconds
        rows["all"].append(err)
        rows[kind(prefill, seqs)].append(err)
        mixes.setdefault(mix(prefill, seqs), []).append((seconds, predicted))
    summary = {k: _stats(v) for k, v in rows.items() if v}
    by_mix = [{"mix": name, "n": len(pairs),
               "measured_ms": 1e3 * statistics.median(m for m, _ in pairs),
               "predicted_ms": 1e3 * statistics.median(p for _, p in pairs),
               "median_abs_pct": statistics.median(abs(p - m) / m * 100 for m, p in pairs)}
              for name, pairs in sorted(mixes.items(), key=lambda kv: _MIXES.index(kv[0]))]
    return {"num_fit_steps": split, "num_test_steps": len(steps) - split,
            "coefficients": asdict(coefficients), "error_pct": summary, "by_mix": by_mix,
            "fit_ms": round(fit_ms, 1)}


_SEQS = ((4, "1-4"), (8, "5-8"), (16, "9-16"), (10**9, "17+"))
_TOKENS = ((64, "1-64"), (512, "65-512"), (1024, "513-1024"), (10**9, "1025+"))
_MIXES = (tuple(f"decode only, {label} seqs" for _, label in _SEQS)
          + tuple(f"with {label} prefill tokens" for _, label in _TOKENS))


def mix(prefill_tokens: int, decode_seqs: int) -> str:
    """The bucket a step falls in: its decode batch size, or its prefill tokens if any."""
    if prefill_tokens:
        label = next(name for top, name in _TOKENS if prefill_tokens <= top)
        return f"with {label} prefill tokens"
    return f"decode only, {next(name for top, name in _SEQS if decode_seqs <= top)} seqs"


def _stats(errors: list[float]) -> dict[str, float]:
    absolute = sorted(abs(e) for e in errors)
    return {"n": len(errors), "median_abs": statistics.median(absolute),
            "p90_abs": absolute[max(0, math.ceil(0.9 * len(absolute)) - 1)],
            "mean_signed": statistics.fmean(errors)}


def markdown(doc: dict[str, Any]) -> str:
    result = doc["result"]
    lines = [f"# Cost-model fit: {doc['model']} on {doc['device_name']} ({doc['date']})", "",
             f"`{doc['command']}`", ""]
    if "source" in doc:
        lines += [f"Raw steps of `{doc['source']}` (measured {doc['measured']}), refitted "
                  f"offline with the current `StepCostModel`; before = the model of that run.", ""]
    lines += [f"Fitted online on {result['num_fit_steps']} steps, tested on the next "
              f"{result['num_test_steps']} (prediction minus measured, % of measured).", ""]
    before = doc.get("before", {}).get("error_pct", {})
    extra = " | before: median abs % | before: mean signed %" if before else ""
    lines += [f"| steps | n | median abs error % | p90 abs error % | mean signed %{extra} |",
              "| --- | ---: | ---: | ---: | ---:" + " | ---: | ---:" * bool(before) + " |"]
    for name, s in result["error_pct"].items():
        row = (f"| {name} | {s['n']} | {s['median_abs']:.1f} | {s['p90_abs']:.1f} | "
               f"{s['mean_signed']:+.1f} |")
        if before:
            b = before.get(name)
            row += (f" {b['median_abs']:.1f} | {b['mean_signed']:+.1f} |" if b else " - | - |")
        lines.append(row)
    if result.get("by_mix"):
        lines += ["", "By mix (test steps; medians):", "",
                  "| steps | n | measured ms | predicted ms | abs error % |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['mix']} | {r['n']} | {r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | "
                  f"{r['median_abs_pct']:.1f} |" for r in result["by_mix"]]
    lines += ["", "Fitted: " + ", ".join(f"{k} = {v:.3g}" for k, v in
                                         result["coefficients"].items())]
    if "before" in doc:
        lines += ["", "Before: " + ", ".join(f"{k} = {v:.3g}" for k, v in
                                             doc["before"]["coefficients"].items())]
    lines += ["", f"One refit over the fit steps took {result['fit_ms']} ms (pure Python)."]
    return "\n".join(lines) + "\n"


def run_engine(args: argparse.Namespace, command: str) -> tuple[dict[str, Any], str]:
    """Steps of a real engine: a warm-up workload (every kernel shape compiles), then one
    measured; the document and the result file stem."""
    import torch

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    torch.set_num_threads(args.threads)
    kv_memory = args.kv_cache_memory or ("1GiB" if args.device == "cpu" else None)
    config = EngineConfig(model=args.model, load_format=args.load_format, device=args.device,
                          max_model_len=args.max_model_len, kv_cache_memory=kv_memory)
    engine = LLMEngine.from_config(config)
    workload(engine, args.requests, args.seed + 1)
    t0 = time.perf_counter()
    steps = [(s.seconds, s.num_prefill_tokens, s.num_decode_seqs, s.num_context_tokens)
             for s in workload(engine, args.requests, args.seed)]
    device_name = (torch.cuda.get_device_name() if config.torch_device.type == "cuda"
                   else f"{platform.processor() or platform.machine()} CPU, "
                        f"{args.threads} thread(s)")
    doc = {"command": command, "model": args.model, "device_name": device_name,
           "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1),
           "num_steps": len(steps), "result": evaluate(steps, args.fit_fraction),
           # raw, to refit other model forms offline: seconds, prefill tokens, decode seqs, context
           "steps": [list(s) for s in steps]}
    return doc, f"cost_fit_{args.tag or config.torch_device.type}_{doc['date']}"


def refit_saved(args: argparse.Namespace, command: str) -> tuple[dict[str, Any], str]:
    """A saved run's raw steps re-evaluated with the current model (no engine)."""
    path = Path(args.from_json)
    saved = json.loads(path.read_text())
    if not isinstance(saved.get("steps"), list) or not saved["steps"]:
        raise SystemExit(f"{path}: no raw \"steps\" list (runs before raw steps were saved "
                         f"cannot be refitted)")
    steps = [(float(s), int(p), int(d), int(c)) for s, p, d, c in saved["steps"]]
    date = time.strftime("%Y-%m-%d")
    doc = {"command": command, "source": str(path), "model": saved.get("model", "?"),
           "device_name": saved.get("device_name", "?"), "measured": saved.get("date", "?"),
           "date": date, "num_steps": len(steps), "before": saved.get("result", {}),
           "result": evaluate(steps, args.fit_fraction), "steps": saved["steps"]}
    stem = path.stem.removesuffix(f"_{saved.get('date', '')}")
    return doc, f"{args.tag or stem}_refit_{date}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="Re-evaluate the raw steps saved in FILE (a result JSON of this "
                        "script) with the current model; no engine runs")
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
    p.add_argument("--tag", default="", help="Result file name part (default: device kind, "
                                              "or the source file's name with --from-json)")
    args = p.parse_args(argv)
    command = "python -m bench.cost_fit " + " ".join(sys.argv[1:] if argv is None else argv)
    doc, name = refit_saved(args, command) if args.from_json else run_engine(args, command)
    text = markdown(doc)
    print(text)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
