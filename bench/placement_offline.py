"""Adaptive placement offline: the planner's simulator (which runs the proxy's own rule) on the
placement sweeps' workloads, over several seeds, before any real sweep.

For each measured sweep (bench/placement_sweep.sh's JSON: its lengths, rates, SLOs and flags),
every configuration it ran (1p1d, colocated-x2, adaptive) is simulated at each rate with the
sweep's seed and `--extra-seeds` more draws of the same workload, on a measured CPU profile;
the table gives SLO attainment per rate (the mean over seeds, and the worst), the prefills placed
remote, and goodput per seed (the highest rate up to which every rate reaches the attainment
target). A fixed serving overhead (`--overhead-s`, the calibrated one of
plan_validation_cpu-calibrated: 37 ms) delays every first token; `--learn-corrections` lets the
rule see the placer's learned TTFT corrections instead.

    python -m bench.placement_offline --tag after
    python -m bench.placement_offline --extra-seeds 4 --tag after

Writes bench/results/placement_offline_<tag>_<date>.{json,md} with the command. A prediction,
not a measurement: the real sweep (bench/placement_sweep.sh) decides.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.plan_validate import spec_of, workload
from planner.profile import Profile, StepTimes
from planner.search import run_config

SWEEPS = ["bench/results/placement_cpu_prefill_heavy_2026-12-06_40req.json",
          "bench/results/placement_cpu_interference_2026-12-06.json"]
PROFILE = "bench/results/profile_cpu_2026-12-06.json"


def simulate_sweep(profile: Profile, sweep: dict[str, Any], seeds: list[int], overhead_s: float,
                   learn: bool, step_overhead_s: float = 0.0) -> list[dict[str, Any]]:
    """Per configuration of `sweep`: attainment per rate and goodput, for each seed."""
    slo, rates = sweep["slo"], sweep["request_rates"]
    times = StepTimes(profile, step_overhead_s)
    configs = []
    for c in sweep["configs"]:
        spec = replace(spec_of(c["server"], sweep["serve_args"], 0.0),
                       remote_overhead_s=overhead_s, local_overhead_s=overhead_s)
        if learn:
            spec = replace(spec, learn_corrections=True)
        runs = []
        for seed in seeds:
            drawn = copy.deepcopy(sweep)
            drawn["load"]["seed"] = seed
            r = run_config(profile, spec, rates, workload(drawn), slo["attainment"], times,
                           slo["ttft_s"], slo["tpot_s"])
            runs.append({"seed": seed, "goodput": r.goodput,
                         "attainment": [p.attainment for p in r.points],
                         "num_remote": [p.num_remote for p in r.points],
                         "num_requests": [p.num_requests for p in r.points],
                         "ttft_p90_s": [p.ttft_p90_s for p in r.points],
                         "tpot_p90_s": [p.tpot_p90_s for p in r.points]})
        configs.append({"name": c["name"], "spec": spec.name, "runs": runs})
    return configs


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Adaptive placement offline ({doc['date']}, {doc['commit']})", "",
             f"`{doc['command']}`", "",
             f"Simulator (planner/) running the proxy's rule on {doc['profile']}; serving "
             f"overhead {doc['overhead_s'] * 1000:.0f} ms per request and "
             f"{doc.get('step_overhead_s', 0.0) * 1000:.1f} ms per step; learned corrections "
             f"{'on' if doc['learn_corrections'] else 'off'}; seeds {doc['seeds']}. "
             "A prediction, not a measurement.", ""]
    for v in doc["sweeps"]:
        slo = v["slo"]
        lines += [f"## {Path(v['sweep_file']).name}", "",
                  f"SLO TTFT {slo['ttft_s']} s, TPOT {slo['tpot_s'] * 1000:.0f} ms, attainment "
                  f"{slo['attainment']:.0%}; rates {v['rates']} req/s.", "",
                  "| config | attainment per rate: mean (worst) | remote prefills per rate "
                  "(mean) | goodput per seed (req/s) |", "| --- | --- | --- | --- |"]
        for c in v["configs"]:
            runs, n = c["runs"], len(c["runs"])
            att = " / ".join(
                f"{sum(r['attainment'][i] for r in runs) / n:.0%} "
                f"({min(r['attainment'][i] for r in runs):.0%})" for i in range(len(v["rates"])))
            remote = " / ".join(
                f"{sum(r['num_remote'][i] for r in runs) / n:.1f} of "
                f"{runs[0]['num_requests'][i]}" for i in range(len(v["rates"])))
            good = ", ".join("-" if r["goodput"] is None else f"{r['goodput']:g}" for r in runs)
            lines.append(f"| {c['name']} | {att} | {remote} | {good} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default=PROFILE)
    p.add_argument("--sweeps", nargs="+", default=SWEEPS)
    p.add_argument("--extra-seeds", type=int, default=4,
                   help="Draws of each workload besides the sweep's own seed.")
    p.add_argument("--overhead-s", type=float, default=0.037)
    p.add_argument("--step-overhead-s", type=float, default=0.0,
                   help="Serving time per model step (bench.plan_validate --calibrate fits it).")
    p.add_argument("--learn-corrections", action="store_true")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    profile = Profile.load(args.profile)
    docs = []
    for f in args.sweeps:
        sweep = json.loads(Path(f).read_text())
        seeds = [sweep["load"]["seed"] + 100 * k for k in range(args.extra_seeds + 1)]
        docs.append({"sweep_file": f, "slo": sweep["slo"], "rates": sweep["request_rates"],
                     "seeds": seeds, "configs": simulate_sweep(
                         profile, sweep, seeds, args.overhead_s, args.learn_corrections,
                         args.step_overhead_s)})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    day = time.strftime("%Y-%m-%d")
    doc = {"date": day, "commit": commit, "command": "python -m bench.placement_offline "
           + shlex.join(argv if argv is not None else sys.argv[1:]), "profile": args.profile,
           "overhead_s": args.overhead_s, "step_overhead_s": args.step_overhead_s,
           "learn_corrections": args.learn_corrections,
           "seeds": docs[0]["seeds"] if docs else [], "sweeps": docs}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"placement_offline_{args.tag}_{day}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    text = markdown(doc)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
