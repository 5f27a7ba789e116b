"""The planner's engine model against the engine itself, on one busy or quiet machine alike.

Takes a short profile of one engine (deploy/profiler.py, in this process), then runs the same
engine in real time on Poisson arrivals (no proxy, no HTTP: requests are added as they arrive
and the engine steps whenever it has work) and simulates the same requests on a colocated
worker of the planner (planner/simulator.py, no chunk caps, as the bare engine runs). The
profile and the run happen back to back, so a contended machine slows both alike: this isolates
the simulator's model of an engine (batching under the token budget, mixed steps, continuous
batching) from the proxy and the hops, which the sweep comparison (bench/plan_validate.py)
includes.

    python -m bench.plan_engine_check [--budget-s 60] [--rates 0.3,0.6,0.9] [--cpu-core 0]

Writes bench/results/plan_engine_check_<date>.{json,md} with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from deploy.profiler import Budget, Profiler, log_stderr
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from planner.profile import EngineLimits, Profile, StepTimes
from planner.search import percentile
from planner.servers import SimRequest
from planner.simulator import ClusterSpec, simulate


def take_profile(engine: LLMEngine, budget_s: float) -> Profile:
    prof = Profiler(engine, Budget(budget_s, log_stderr))
    prof._run([prof._prompt(32)], 4)
    prefill, chunked, decode, mixed = prof.prefill(), prof.chunked(), prof.decode(), prof.mixed()
    c = engine.config
    return Profile(EngineLimits(c.max_num_batched_tokens, c.max_num_seqs, c.block_size,
                                engine.plan.num_tokens, engine.plan.max_model_len),
                   float(engine.plan.spec.bytes_per_token), prefill, decode, chunked, mixed,
                   {}, [[s.seconds, s.num_prefill_tokens, s.num_decode_seqs,
                         s.num_context_tokens] for s in prof.steps])


def requests(rate: float, num: int, lo: int, hi: int, out: int, seed: int) -> list[SimRequest]:
    rng, t, reqs = random.Random(seed), 0.0, []
    for _ in range(num):
        reqs.append(SimRequest(t, rng.randint(lo, hi), out))
        t += rng.expovariate(rate)
    return reqs


def run_real(engine: LLMEngine, reqs: list[SimRequest], seed: int) -> list[tuple[float, float]]:
    """(first token, last token) seconds after each request's arrival, measured."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(r.prompt_tokens)] for r in reqs]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    t0, i = time.perf_counter(), 0
    while i < len(reqs) or engine.has_unfinished:
        now = time.perf_counter() - t0
        while i < len(reqs) and reqs[i].arrival_s <= now:
            engine.add_request(f"r{i}", prompts[i], SamplingParams(
                max_tokens=reqs[i].output_tokens, temperature=0.0, ignore_eos=True))
            i += 1
        if not engine.has_unfinished:
            time.sleep(max(0.0, reqs[i].arrival_s - now))
            continue
        for out in engine.step():
            if out.new_token_ids:
                at = time.perf_counter() - t0
                first.setdefault(out.request_id, at)
                last[out.request_id] = at
    return [(first[f"r{k}"] - r.arrival_s, last[f"r{k}"] - r.arrival_s)
            for k, r in enumerate(reqs)]


def stats(pairs: list[tuple[float, float]], reqs: list[SimRequest]) -> dict[str, float]:
    ttft = [f for f, _ in pairs]
    tpot = [(e - f) / (r.output_tokens - 1) for (f, e), r in zip(pairs, reqs, strict=True)]
    return {"ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90),
            "tpot_p50": percentile(tpot, 50), "tpot_p90": percentile(tpot, 90)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=60.0)
    p.add_argument("--rates", default="", help="req/s (default: 30/60/90 % of the capacity)")
    p.add_argument("--num-prompts", type=int, default=30)
    p.add_argument("--input-len", default="64:256", help="LO:HI prompt tokens")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--cpu-core", type=int, default=None)
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    if args.cpu_core is not None:
        os.sched_setaffinity(0, {args.cpu_core})
    torch.set_num_threads(1)
    engine = LLMEngine.from_config(EngineConfig(max_model_len=2048, kv_cache_memory="1GiB"))
    profile = take_profile(engine, args.budget_s)
    lo, hi = (int(x) for x in args.input_len.split(":"))
    mean = (lo + hi) / 2
    times = StepTimes(profile)
    service = times.prefill_s(mean) + (args.output_len - 1) * times.decode_s(1, mean)
    rates = ([float(x) for x in args.rates.split(",")] if args.rates
             else [round(f / service, 3) for f in (0.3, 0.6, 0.9)])
    rows = []
    for k, rate in enumerate(rates):
        reqs = requests(rate, args.num_prompts, lo, hi, args.output_len, seed=k)
        measured = stats(run_real(engine, reqs, k), reqs)
        sim = simulate(profile, ClusterSpec(0, 1, "local", chunk_caps=False), reqs)
        predicted = stats([(o.ttft_s, o.finish_s - o.request.arrival_s) for o in sim], reqs)
        rows.append({"rate": rate, "measured": measured, "predicted": predicted,
                     "err_pct": {m: 100 * (predicted[m] - measured[m]) / measured[m]
                                 for m in measured}})
        log_stderr(f"rate {rate}: " + ", ".join(f"{m} {predicted[m] * 1000:.0f}/"
                                                f"{measured[m] * 1000:.0f} ms" for m in measured))
    day = time.strftime("%Y-%m-%d")
    doc = {"date": day, "command": "python -m bench.plan_engine_check " + shlex.join(
        argv if argv is not None else sys.argv[1:]), "load_avg": os.getloadavg(),
           "workload": vars(args), "rows": rows, "profile": json.loads(profile.to_json())}
    lines = [f"# Planner vs a bare engine ({day}, load average {doc['load_avg'][0]:.1f})", "",
             f"`{doc['command']}`", "", "SmolLM2, 1 torch thread, prompts "
             f"{args.input_len} tokens, {args.output_len} output tokens, Poisson arrivals, "
             f"{args.num_prompts} requests per rate. Predicted / measured ms (error %).", "",
             "| rate (req/s) | TTFT p50 | TTFT p90 | TPOT p50 | TPOT p90 |",
             "| ---: | --- | --- | --- | --- |"]
    for r in rows:
        cells = [f"{r['predicted'][m] * 1000:.0f} / {r['measured'][m] * 1000:.0f} "
                 f"({r['err_pct'][m]:+.0f})" for m in ("ttft_p50", "ttft_p90", "tpot_p50",
                                                       "tpot_p90")]
        lines.append(f"| {r['rate']:g} | " + " | ".join(cells) + " |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"plan_engine_check_{day}.json").write_text(json.dumps(doc, indent=1))
    (out / f"plan_engine_check_{day}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
