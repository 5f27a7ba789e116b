"""The planner against measured sweeps: profile (optional), predict, compare, in one command.

For every configuration and rate of each measured `pdserve bench sweep` JSON, the simulator
(planner/) runs the same workload (the sweep's lengths and Poisson arrivals from its seed, as
bench/datasets.py and bench/loadgen.py draw them) on the configuration's `pdserve serve` flags,
and the table puts predicted and measured side by side: attainment, TTFT p90, TPOT p90, goodput.
Targets (issue 15): goodput within one rate step of the measured one; p90 TTFT and TPOT within
25 % at every rate where the measured run meets the SLO.

    # CPU, this machine: take the profile as the sweeps ran (one torch thread, pinned), compare
    python -m bench.plan_validate --take-profile --budget-s 300
    # each configuration its own sweep with a profile taken just before it
    # (BRACKET=1 bash bench/placement_sweep.sh): each sweep against its own profile
    python -m bench.plan_validate --sweeps a.json b.json --profiles pa.json pb.json --calibrate 1p1d
    # a profile taken elsewhere (bench/gpu_profile.sh), against the 2xH200 sweep
    python -m bench.plan_validate --profile bench/results/profile_h100_llama3-8b-shape.json \
        --sweeps bench/results/sweep_h200x2_2026-11-22.json --transfer-gbps 205.8 --tag gpu

Writes bench/results/plan_validation_<tag>_<date>.{json,md} with the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.datasets import DatasetConfig, build_dataset
from bench.loadgen import arrival_offsets
from bench.serving_trace import point_span
from bench.sweep_repeat import fmt_interval
from bench.sweep_repeat import measured as measured_point
from deploy.cli import build_parser
from planner.profile import BlendedStepTimes, CoRun, Profile, StepTimes
from planner.search import goodput, run_config
from planner.servers import SimRequest
from planner.simulator import ClusterSpec

CPU_SWEEPS = ["bench/results/placement_cpu_prefill_heavy_2026-12-06.json",
              "bench/results/placement_cpu_interference_2026-12-06.json"]
# bench/placement_sweep.sh's engine flags (its --serve-args, less the launcher's own)
CPU_ENGINE_ARGS = ["--kv-cache-memory", "256MiB", "--max-model-len", "2048"]


def take_cpu_profile(path: Path, budget_s: float, core: int) -> None:
    """`pdserve profile` as the sweeps' workers ran: one torch thread, pinned to one core."""
    cmd = [sys.executable, "-m", "deploy.cli", "profile", "--out", str(path), "--budget-s",
           str(budget_s), "--threads", "1", "--cpu-core", str(core), *CPU_ENGINE_ARGS]
    print("$", shlex.join(cmd), flush=True)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run(cmd, check=True, env=env)


@dataclass(frozen=True)
class SimModel:
    """How the simulator models what the profile does not hold (planner/simulator.py)."""

    step_noise: float = 0.0
    prefill_noise: float = 0.0
    draws: int = 8
    online_fits: bool = False
    learn_corrections: bool = False
    corun: CoRun | None = None  # the workers share this machine's cores: these factors

    def apply(self, spec: ClusterSpec) -> ClusterSpec:
        return replace(spec, step_noise=self.step_noise, prefill_noise=self.prefill_noise,
                       online_fits=self.online_fits, learn_corrections=self.learn_corrections,
                       corun=self.corun)

    def describe(self) -> str:
        parts = [f"step noise sigma {self.step_noise:g} with decodes, {self.prefill_noise:g} "
                 f"without ({self.draws} draws per rate)"
                 if self.step_noise or self.prefill_noise else "no step noise",
                 "online per-worker cost fits" if self.online_fits
                 else "one profile fit for every worker's placement cost model"]
        if self.learn_corrections:
            parts.append("the placer's TTFT corrections learned from the simulated first tokens")
        if self.corun is not None:
            parts.append("co-run factors " + ", ".join(
                f"{k} {v:g}" for k, v in asdict(self.corun).items()))
        return "Simulator: " + ", ".join(parts) + "."


def spec_of(server: str, serve_args: str, transport_gbps: float,
            unnamed_placement: str = "") -> ClusterSpec:
    """The ClusterSpec of a measured configuration, from its `pdserve serve` flags;
    `unnamed_placement` stands for the placement of a run that named none (a sweep older than
    placement, 2026-12-06, ran every prompt remote, and its colocated workers prefilled each
    prompt in the engine's token budget, not in the placement rule's chunk caps)."""
    argv = shlex.split(server)[1:] + shlex.split(serve_args)
    if unnamed_placement and "--placement" not in argv:
        argv += ["--placement", unnamed_placement]
    # the parsed flags, not ServeConfig: its checks need the measured machine (CUDA for nccl)
    serve = build_parser().parse_args(argv)
    transport = ("nccl" if serve.transport == "nccl"
                 else "frames" if serve.kv_payload == "frames" else "stream")
    if serve.colocated:  # a server older than placement ran local prompts uncapped
        return ClusterSpec(0, serve.decode, "local", serve.slo_ttft, serve.slo_tpot, transport,
                           transfer_gbps=transport_gbps, chunk_caps=not unnamed_placement)
    return ClusterSpec(serve.prefill, serve.decode, serve.placement, serve.slo_ttft,
                       serve.slo_tpot, transport, transfer_gbps=transport_gbps)


def workload(sweep: dict[str, Any]) -> Callable[[float], list[SimRequest]]:
    """rate -> the requests `pdserve bench sweep` sent at it: rate i of the sweep draws its
    lengths and arrivals from seed + i (bench/sweep.py)."""
    d, load = sweep["dataset"], sweep["load"]
    cfg = DatasetConfig(**{k: d[k] for k in ("dataset", "dataset_path", "num_prompts",
                                              "input_len", "output_len", "num_turns",
                                              "system_prompt_len", "max_prompt_len")})
    rates = [float(r) for r in sweep["request_rates"]]

    def at(rate: float) -> list[SimRequest]:
        seed = load["seed"] + rates.index(float(rate))
        # lengths are drawn before any text, so no tokenizer is needed to reproduce them
        lengths = [(r.num_prompt_tokens, r.max_tokens) for r in build_dataset(cfg, None, seed)]
        offsets = arrival_offsets(len(lengths), rate, load["burstiness"],
                                  np.random.default_rng(seed))
        return [SimRequest(float(t), n, m) for t, (n, m) in zip(offsets, lengths, strict=True)]
    return at


def _err(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas <= 0:
        return None
    return 100.0 * (pred - meas) / meas


def _inside(pred: float | None, iv: tuple[float, float] | None) -> bool | None:
    """A prediction inside the measured p90's bootstrap interval; None where the sweep kept no
    request records to resample (older sweeps)."""
    if iv is None:
        return None
    return pred is None or iv[0] <= pred <= iv[1]


def _both(a: bool | None, b: bool | None) -> bool | None:
    return None if a is None or b is None else a and b


def _step_index(rates: list[float], goodput: float | None) -> int:
    return -1 if goodput is None else rates.index(goodput)


def _taken_at(profile: Profile) -> float:
    """When a profile measured, in epoch seconds: the middle of its run (`date` is its end)."""
    end = dt.datetime.fromisoformat(str(profile.meta["date"])).timestamp()
    return end - float(profile.meta.get("measured_s", 0.0)) / 2


def drift_weight(before: Profile, after: Profile, point: dict[str, Any]) -> float:
    """Where a measured point ran between two profiles (0: at the first, 1: at the second), from
    its start and its requests' span; 0.5 for a point without records (a sweep older than
    `started_at`)."""
    if (span := point_span(point)) is None:
        return 0.5
    mid = (span[0] + span[1]) / 2
    t0, t1 = _taken_at(before), _taken_at(after)
    return min(max((mid - t0) / (t1 - t0), 0.0), 1.0) if t1 > t0 else 0.5


def point_times(profile: Profile, after: Profile | None, point: dict[str, Any],
                step_overhead_s: float) -> tuple[Profile, StepTimes]:
    """The profile (for the placer's cost fit) and the step times one measured point is
    predicted with: `profile`'s, or with `after` (the profile taken after the sweep) blended
    by when the point ran, and the nearer profile's fit."""
    if after is None:
        return profile, StepTimes(profile, step_overhead_s)
    w = drift_weight(profile, after, point)
    return (profile if w < 0.5 else after), BlendedStepTimes(profile, after, w, step_overhead_s)


def serving_overhead(profile: Profile, sweep: dict[str, Any], name: str, gbps: float,
                     unnamed_placement: str = "", model: SimModel | None = None,
                     after: Profile | None = None) -> tuple[float, float]:
    """What bare engine steps leave out, fitted on ONE measured point (configuration `name`'s
    lowest rate); the other configurations and rates then test it. Returns (per request: proxy,
    HTTP, tokenization, hops = measured minus predicted TTFT p50; per model step: scheduling,
    sampling's sync, streaming tokens = measured minus predicted TPOT p50), both >= 0."""
    c = next((c for c in sweep["configs"] if c["name"] == name), None)
    if c is None or not c["points"]:
        raise SystemExit(f"--calibrate {name}: no such configuration with points in the sweep "
                         f"({', '.join(x['name'] for x in sweep['configs'])})")
    model = model or SimModel()
    spec = model.apply(spec_of(c["server"], sweep["serve_args"], gbps, unnamed_placement))
    rate, measured = sweep["request_rates"][0], c["points"][0]["summary"]

    def predict(step_s: float) -> Any:
        fit, times = point_times(profile, after, c["points"][0], step_s)
        return run_config(fit, spec, [rate], workload(sweep), sweep["slo"]["attainment"],
                          times, sweep["slo"]["ttft_s"], sweep["slo"]["tpot_s"],
                          model.draws).points[0]
    step_s = 0.0
    tpot = (measured.get("tpot") or {}).get("median")
    if tpot is not None and predict(0.0).tpot_p50_s is not None:
        step_s = max(0.0, tpot - predict(0.0).tpot_p50_s)
    return max(0.0, measured["ttft"]["median"] - predict(step_s).ttft_p50_s), step_s


def compare(profile: Profile, sweep: dict[str, Any], gbps: float,
            unnamed_placement: str = "", overhead_s: float = 0.0,
            step_overhead_s: float = 0.0, model: SimModel | None = None,
            after: Profile | None = None) -> dict[str, Any]:
    """Predicted vs measured for each configuration and rate of `sweep`; with `after` (the
    profile taken after the sweep) each point's step times are blended by when it ran."""
    rates, slo = sweep["request_rates"], sweep["slo"]
    at = workload(sweep)
    configs, model = [], model or SimModel()
    for c in sweep["configs"]:
        spec = replace(model.apply(spec_of(c["server"], sweep["serve_args"], gbps,
                                           unnamed_placement)),
                       remote_overhead_s=overhead_s, local_overhead_s=overhead_s)
        points = []
        for rate, m in zip(rates, c["points"], strict=True):
            fit, times = point_times(profile, after, m, step_overhead_s)
            points += run_config(fit, spec, [rate], at, slo["attainment"], times,
                                 slo["ttft_s"], slo["tpot_s"], model.draws).points
        best, _ = goodput(points, slo["attainment"])
        rows = []
        for p, m in zip(points, c["points"], strict=True):
            s = m["summary"]
            met = s["attainment"] >= slo["attainment"]
            iv = measured_point(m).interval  # how much the measured p90 moves by chance
            rows.append({"ttft_p90_interval": iv["ttft"], "tpot_p90_interval": iv["tpot"],
                         "inside": _both(_inside(p.ttft_p90_s, iv["ttft"]),
                                         _inside(p.tpot_p90_s, iv["tpot"])),
                         "rate": p.rate, "attainment_pred": p.attainment,
                         "attainment_meas": s["attainment"],
                         "ttft_p90_pred": p.ttft_p90_s, "ttft_p90_meas": s["ttft"]["p90"],
                         "tpot_p90_pred": p.tpot_p90_s,
                         "tpot_p90_meas": (s.get("tpot") or {}).get("p90"),
                         "slo_met_measured": met,
                         "ttft_err_pct": _err(p.ttft_p90_s, s["ttft"]["p90"]),
                         "tpot_err_pct": _err(p.tpot_p90_s, (s.get("tpot") or {}).get("p90"))})
        steps = abs(_step_index(rates, best) - _step_index(rates, c["goodput"]["rate"]))
        checked = [r for r in rows if r["slo_met_measured"]]
        within = all(abs(r[k]) <= 25 for r in checked for k in ("ttft_err_pct", "tpot_err_pct")
                     if r[k] is not None)
        inside = (None if any(r["inside"] is None for r in checked)
                  else all(r["inside"] for r in checked))
        configs.append({"name": c["name"], "server": c["server"], "spec": spec.name,
                        "p90_inside_interval": inside,
                        "goodput_pred": best, "goodput_meas": c["goodput"]["rate"],
                        "goodput_steps_off": steps, "goodput_ok": steps <= 1,
                        "p90_within_25pct": within, "rows": rows})
    return {"sweep": sweep["command"], "slo": slo, "rates": rates, "configs": configs}


# what the drift table reads from each profile: (label, prefill tokens, decode sequences, context)
DRIFT_PROBES = (("prefill 512 tokens", 512, 0, 0), ("decode 1 seq at 600 tokens", 0, 1, 600),
                ("decode 4 seqs at 600 tokens each", 0, 4, 2400))


def drift(profiles: list[tuple[str, Profile]]) -> list[dict[str, Any]]:
    """The same steps as each profile models them, relative to the first profile: how much the
    machine moved between profiles (a 2-core VM's decode steps moved 10-45 % within 70 minutes,
    2026-12-06)."""
    rows, first = [], None
    for path, profile in profiles:
        times = StepTimes(profile)
        ms = [1e3 * times.step_s(p, 0, d, c) for _, p, d, c in DRIFT_PROBES]
        first = first or ms
        rows.append({"profile": path, "date": profile.meta.get("date"), "step_ms": ms,
                     "vs_first": [m / f for m, f in zip(ms, first, strict=True)]})
    return rows


def _yes(x: bool | None) -> str:
    return "n/a (no request records)" if x is None else "yes" if x else "no"


def _fmt(x: float | None, scale: float = 1000.0) -> str:
    return "-" if x is None else f"{x * scale:.0f}"


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Planner validation ({doc['date']}): predicted vs measured", "",
             f"`{doc['command']}`", "", f"Profile: {doc['profile_path']} ({doc['device']}, "
             f"taken {doc['profile_date']}). {doc['note']}", "",
             doc.get("simulator", ""), ""]
    if len(doc.get("drift", [])) > 1:
        lines += ["Each sweep is predicted from its own profile (below, with the sweep). The same "
                  "steps as each profile models them (ms; x the first profile):", "",
                  "| profile | taken | " + " | ".join(p[0] for p in DRIFT_PROBES) + " |",
                  "| --- | --- |" + " ---: |" * len(DRIFT_PROBES)]
        for d in doc["drift"]:
            lines.append(f"| {Path(d['profile']).name} | {d['date']} | " + " | ".join(
                f"{m:.0f} (x{r:.2f})" for m, r in zip(d["step_ms"], d["vs_first"], strict=True))
                + " |")
        lines.append("")
    if doc.get("calibrated_on"):
        lines += [f"Serving overhead {doc['serving_overhead_s'] * 1000:.0f} ms added to every "
                  f"TTFT and {doc.get('step_overhead_s', 0.0) * 1000:.1f} ms to every model "
                  f"step, fitted on one measured point ({doc['calibrated_on']}: measured minus "
                  f"predicted TPOT p50, then TTFT p50); every other point tests them.", ""]
    for v in doc["validations"]:
        slo = v["slo"]
        own = (f"Profile: {Path(v['profile']).name} (taken {v['profile_date']})"
               + (f", blended per point with {Path(v['profile_after']).name} by when the point "
                  f"ran" if v.get("profile_after") else "") + ". "
               if len(doc.get("drift", [])) > 1 else "")
        lines += [f"## {Path(v['sweep_file']).name}", "", own + f"SLO TTFT {slo['ttft_s']} s, TPOT "
                  f"{slo['tpot_s'] * 1000:.0f} ms, attainment {slo['attainment']:.0%}. "
                  f"Measured: `{v['sweep'][:160]}...`", "",
                  "| config | rate | attainment pred / meas | TTFT p90 ms pred / meas "
                  "[interval] (err %) | TPOT p90 ms pred / meas [interval] (err %) |",
                  "| --- | ---: | --- | --- | --- |"]
        for c in v["configs"]:
            for r in c["rows"]:
                te = "" if r["ttft_err_pct"] is None else f" ({r['ttft_err_pct']:+.0f})"
                pe = "" if r["tpot_err_pct"] is None else f" ({r['tpot_err_pct']:+.0f})"
                lines.append(f"| {c['name']} | {r['rate']:g} | {r['attainment_pred']:.0%} / "
                             f"{r['attainment_meas']:.0%} | {_fmt(r['ttft_p90_pred'])} / "
                             f"{_fmt(r['ttft_p90_meas'])}"
                             f"{fmt_interval(r.get('ttft_p90_interval'))}{te} | "
                             f"{_fmt(r['tpot_p90_pred'])} / {_fmt(r['tpot_p90_meas'])}"
                             f"{fmt_interval(r.get('tpot_p90_interval'))}{pe} |")
        lines += ["", "| config | goodput pred / meas (req/s) | within one rate step | "
                  "p90 within 25 % where the SLO is met | p90 inside the measured interval "
                  "there |", "| --- | --- | --- | --- | --- |"]
        for c in v["configs"]:
            lines.append(f"| {c['name']} | {c['goodput_pred']} / {c['goodput_meas']} | "
                         f"{'yes' if c['goodput_ok'] else 'no'} | "
                         f"{'yes' if c['p90_within_25pct'] else 'no'} | "
                         f"{_yes(c.get('p90_inside_interval'))} |")
        lines.append("")
    configs = [c for v in doc["validations"] for c in v["configs"]]
    graded = [c for c in configs if c.get("p90_inside_interval") is not None]
    lines.append(f"In all: goodput within one rate step {sum(c['goodput_ok'] for c in configs)} "
                 f"of {len(configs)}; p90 within 25 % at every SLO-meeting point "
                 f"{sum(c['p90_within_25pct'] for c in configs)} of {len(configs)}; p90 inside "
                 f"the measured p90's 90 % bootstrap interval (its requests resampled) at every "
                 f"SLO-meeting point {sum(c.get('p90_inside_interval') is True for c in graded)} "
                 f"of {len(graded)}" + (f" ({len(configs) - len(graded)} not graded: no request "
                                        f"records)" if len(graded) < len(configs) else "") + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default=None, help="An existing profile JSON.")
    p.add_argument("--profiles", nargs="+", default=None,
                   help="One profile JSON per sweep (in --sweeps' order): each sweep is predicted "
                        "from its own (taken just before it); --calibrate uses the first pair. "
                        "One more (taken after the last sweep) joins only the drift table.")
    p.add_argument("--take-profile", action="store_true",
                   help="Take a CPU profile first (one thread, pinned to --cpu-core).")
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--cpu-core", type=int, default=0)
    p.add_argument("--sweeps", nargs="+", default=CPU_SWEEPS)
    p.add_argument("--transfer-gbps", type=float, default=0.0,
                   help="KV transfer rate measured elsewhere (GB/s); 0: the profile's.")
    p.add_argument("--unnamed-placement", default="", choices=["", "remote", "adaptive"],
                   help="Placement of a measured config that names none (remote for sweeps "
                        "older than adaptive placement, e.g. 2026-11-22).")
    p.add_argument("--calibrate", default="", metavar="CONFIG",
                   help="Fit a serving overhead (added to every TTFT) on one measured point: "
                        "CONFIG's lowest rate in the first sweep; the rest test it.")
    p.add_argument("--interpolate", action="store_true",
                   help="With --profiles and one more profile (taken after the last sweep): "
                        "each measured point's step times are its sweep's profile and the next "
                        "one blended by when the point ran (the machine drifts within the hour).")
    p.add_argument("--after", nargs="+", default=None,
                   help="With --interpolate: the profile taken after each sweep, one per sweep "
                        "(when the sweeps did not run back to back, e.g. one re-measured "
                        "later); default: the next one in --profiles.")
    p.add_argument("--step-noise", type=float, default=0.0,
                   help="Sigma of each simulated step's log-normal time factor "
                        "(`pdserve plan cluster --step-noise`).")
    p.add_argument("--prefill-noise", type=float, default=0.0,
                   help="The same for steps without decoding sequences.")
    p.add_argument("--draws", type=int, default=8, help="With --step-noise: draws per rate.")
    p.add_argument("--online-fits", action="store_true",
                   help="Per-worker placement cost models fitted online (see plan cluster).")
    p.add_argument("--learn-corrections", action="store_true",
                   help="The simulated placer learns its TTFT corrections per placement from "
                        "the simulated first tokens, as the proxy does (proxy/placer.py).")
    p.add_argument("--corun-factors", default="", metavar="LL,LH,HL,HH",
                   help="The workers share this machine's cores: a step's time x the factor "
                        "for what another worker runs as it starts (light: decode only, heavy: "
                        "with prefill tokens; light under light, light under heavy, heavy "
                        "under light, heavy under heavy), as `python -m bench.corun_probe` "
                        "measures them.")
    p.add_argument("--note", default="", help="Said in the results (e.g. 'machine contended').")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    if args.draws < 1 or not (0 <= args.step_noise <= 2 and 0 <= args.prefill_noise <= 2):
        p.error("--draws must be >= 1 and --step-noise, --prefill-noise in [0, 2]")
    if args.profiles is not None and (args.profile or args.take_profile
                                      or len(args.profiles) - len(args.sweeps) not in (0, 1)):
        p.error("--profiles takes one profile per sweep (and one after the last), and neither "
                "--profile nor --take-profile")
    if args.after is not None and (not args.interpolate or args.profiles is None
                                   or len(args.after) != len(args.sweeps)):
        p.error("--after takes one profile per sweep, with --interpolate and --profiles")
    if args.interpolate and args.after is None and (
            args.profiles is None or len(args.profiles) != len(args.sweeps) + 1):
        p.error("--interpolate needs --profiles with one more profile than --sweeps (the last "
                "taken after the last sweep), or --after")
    day = time.strftime("%Y-%m-%d")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.profile or out / f"profile_{args.tag}_{day}.json")
    if args.take_profile:
        take_cpu_profile(path, args.budget_s, args.cpu_core)
    every = (args.profiles or [str(path)]) + list(args.after or [])
    paths = args.profiles[:len(args.sweeps)] if args.profiles else every * len(args.sweeps)
    profiles = {f: Profile.load(f) for f in every}
    profile = profiles[paths[0]]
    sweeps = [(f, json.loads(Path(f).read_text())) for f in args.sweeps]
    model = SimModel(args.step_noise, args.prefill_noise, args.draws, args.online_fits,
                     args.learn_corrections,
                     CoRun.parse(args.corun_factors) if args.corun_factors else None)
    # the profile taken after each sweep (the next one's, or --after's), when interpolating
    after_paths = (args.after or every[1:len(sweeps) + 1]) if args.interpolate else None
    afters = ([profiles[f] for f in after_paths] if after_paths is not None
              else [None] * len(sweeps))
    overhead, step_overhead = serving_overhead(
        profile, sweeps[0][1], args.calibrate, args.transfer_gbps,
        args.unnamed_placement, model, afters[0]) if args.calibrate else (0.0, 0.0)
    validations = [{"sweep_file": f, "profile": pf,
                    "profile_date": profiles[pf].meta.get("date"),
                    "profile_after": after_paths[i] if after_paths is not None else None,
                    **compare(profiles[pf], sweep, args.transfer_gbps, args.unnamed_placement,
                              overhead, step_overhead, model, afters[i])}
                   for i, ((f, sweep), pf) in enumerate(zip(sweeps, paths, strict=True))]
    doc = {"date": day, "command": "python -m bench.plan_validate " + shlex.join(
               argv if argv is not None else sys.argv[1:]),
           "profile_path": ", ".join(dict.fromkeys(paths)), "device": profile.meta.get("device"),
           "profile_date": profile.meta.get("date"), "load_avg": os.getloadavg(),
           "note": args.note, "simulator": model.describe(), "serving_overhead_s": overhead,
           "step_overhead_s": step_overhead,
           "calibrated_on": f"{args.calibrate} at {sweeps[0][1]['request_rates'][0]} req/s in "
                            f"{sweeps[0][0]}" if args.calibrate else None,
           "drift": drift([(f, profiles[f]) for f in dict.fromkeys(every)]),
           "validations": validations}
    stem = out / f"plan_validation_{args.tag}_{day}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    text = markdown(doc)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
