"""`pdserve plan cluster`: predict a cluster from a device profile (planner/), print the split.

    pdserve plan cluster --profile profile.json --num-devices 4 --slo-ttft 1s --slo-tpot 40ms \
        --input-len uniform:2048:7800 --output-len uniform:64:256

The workload is built exactly as `pdserve bench` builds it (bench/datasets.py lengths,
bench/loadgen.py Poisson arrivals from the same seed), or replayed from the per-request records
of a `pdserve bench` result JSON (`--bench-result`).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bench.datasets import DatasetConfig, LengthDist, build_dataset, load_tokenizer
from bench.loadgen import arrival_offsets
from engine.config import ConfigError
from planner import report
from planner.profile import Profile, ProfileError, StepTimes
from planner.search import configurations, recommend, run_config
from planner.servers import SimRequest
from planner.simulator import ClusterSpec, SimulationError
from worker.args import add_dataclass_args, dataclass_from_args, parse_seconds


@dataclass(frozen=True)
class PlanClusterConfig:
    profile: str = field(metadata={"help": "Profile JSON written by `pdserve profile`."})
    num_devices: int = field(default=2, metadata={
        "help": "Devices of the cluster (one worker per device)."})
    slo_ttft: float = field(default=1.0, metadata={
        "parse": parse_seconds, "help": "Time-to-first-token SLO, e.g. 1s or 800ms."})
    slo_tpot: float = field(default=0.05, metadata={
        "parse": parse_seconds, "help": "Time-per-output-token SLO, e.g. 40ms."})
    attainment: float = field(default=0.9, metadata={
        "help": "Share of requests that must meet both SLOs at a rate for it to count."})
    rates: str = field(default="", metadata={
        "help": "Request rates to sweep, e.g. 0.5,1,2 (default: 8 rates up to ~1.5x the "
                "devices' prefill capacity)."})
    placements: str = field(default="remote,adaptive", metadata={
        "help": "Placements to try for each xPyD split (colocated is always tried)."})
    transport: str = field(default="", metadata={
        "help": "KV transport to predict: stream, frames or nccl (default: nccl when the "
                "profile measured it, else stream)."})
    remote_overhead: float = field(default=0.0, metadata={
        "parse": parse_seconds, "help": "Added to a remote request's TTFT (hops)."})
    local_overhead: float = field(default=0.0, metadata={
        "parse": parse_seconds, "help": "Added to a local request's TTFT."})
    step_overhead: float = field(default=0.0, metadata={
        "parse": parse_seconds,
        "help": "Serving time per model step that the profile's bare engine steps leave out "
                "(scheduling, streaming tokens to the proxy), e.g. 5ms; "
                "`python -m bench.plan_validate --calibrate CONFIG` fits it on a measured run."})
    step_noise: float = field(default=0.0, metadata={
        "help": "Sigma of a log-normal factor (median 1) drawn for every simulated step with "
                "decoding sequences: serving steps scatter around the profile's model (`python "
                "-m bench.serving_trace` measures it; ~0.2 on a 2-core VM, 2026-12-06); 0: none."})
    prefill_noise: float = field(default=0.0, metadata={
        "help": "The same for steps without decoding sequences (prefill steps; ~0.1 there)."})
    draws: int = field(default=8, metadata={
        "help": "With --step-noise: simulations per rate (noise seeds), scored together."})
    online_fits: bool = field(default=False, metadata={
        "help": "Each worker's placement cost model fitted online from its own simulated "
                "steps (warm-up, then heartbeats), as the proxy does; default: one fit of the "
                "profile for every worker."})
    transfer_gbps: float = field(default=0.0, metadata={
        "help": "KV transfer rate in GB/s measured elsewhere (e.g. NCCL between two GPUs, "
                "bench/transfer.py --nccl); 0: the profile's measurement for --transport."})
    kv_capacity_tokens: int = field(default=0, metadata={
        "help": "KV cache of one decode worker in tokens (0: the profile's)."})
    bench_result: str | None = field(default=None, metadata={
        "help": "Replay the requests (arrivals, lengths) of a `pdserve bench` result JSON."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Sizes --dataset sharegpt prompts (default: one word = one token)."})
    min_duration: float = field(default=30.0, metadata={
        "parse": parse_seconds,
        "help": "Synthetic workloads: at least this long of arrivals at every rate (more "
                "requests than --num-prompts where a rate needs them), so that a verdict is the "
                "cluster's steady state, not a burst its batches absorb; 0: --num-prompts."})
    burstiness: float = field(default=1.0, metadata={
        "help": "Gamma shape of the arrival gaps (1 = Poisson)."})
    seed: int = field(default=0, metadata={"help": "Seed of the lengths and the arrivals."})
    serve_args: str = field(default="", metadata={
        "help": "Extra flags appended to the recommended `pdserve serve` command."})
    json: bool = field(default=False, metadata={"help": "Print JSON instead of the table."})
    out: str | None = field(default=None, metadata={
        "help": "Also write the JSON (with the workload and the profile's device) to this file."})

    def __post_init__(self) -> None:
        if self.num_devices < 1:
            raise ConfigError(f"--num-devices must be >= 1, got {self.num_devices}")
        if not 0 < self.attainment <= 1:
            raise ConfigError(f"--attainment must be in (0, 1], got {self.attainment}")
        if self.transfer_gbps < 0 or self.kv_capacity_tokens < 0:
            raise ConfigError("--transfer-gbps and --kv-capacity-tokens must be >= 0")
        if not (0 <= self.step_noise <= 2 and 0 <= self.prefill_noise <= 2) or self.draws < 1:
            raise ConfigError(f"--step-noise and --prefill-noise must be in [0, 2] and --draws "
                              f">= 1, got {self.step_noise}, {self.prefill_noise} and "
                              f"{self.draws}")
        if self.burstiness <= 0:
            raise ConfigError(f"--burstiness must be > 0, got {self.burstiness}")
        for p in self.placements.split(","):
            if p not in ("remote", "adaptive", "local"):
                raise ConfigError(f"--placements takes remote, adaptive, local; got {p!r}")


def add_plan_cluster_parser(plan: argparse.ArgumentParser) -> None:
    sub = plan.add_subparsers(dest="plan_mode", metavar="{cluster}")
    text = "Predict goodput of every xPyD split and colocated replicas from a device profile."
    c = sub.add_parser("cluster", help=text, description=text)
    add_dataclass_args(c, PlanClusterConfig)
    add_dataclass_args(c.add_argument_group("workload (as `pdserve bench`)"),  # type: ignore[arg-type]
                       DatasetConfig)
    c.add_argument("--plot", nargs="?", const="plan_cluster.png", default=None, metavar="PNG",
                   help="Write attainment vs rate per configuration (default plan_cluster.png).")
    c.set_defaults(func=cmd_plan_cluster)


def parse_rates(text: str) -> list[float]:
    try:
        rates = sorted(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--rates takes numbers separated by commas, got {text!r}") from None
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise ConfigError(f"--rates must be positive finite numbers, got {text!r}")
    return rates


def recorded_requests(path: str) -> tuple[list[SimRequest], float]:
    """The requests of a `pdserve bench` result, and their mean arrival rate."""
    try:
        doc = json.loads(Path(path).read_text())
        rows = doc["requests"]
        reqs = [SimRequest(float(r["scheduled_s"]),
                           int(r.get("prompt_tokens") or r["expected_prompt_tokens"]),
                           max(1, int(r.get("completion_tokens") or r["expected_output_tokens"])))
                for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--bench-result {path}: not a `pdserve bench` result with "
                          f"per-request records ({type(e).__name__}: {e})") from None
    if not reqs:
        raise ConfigError(f"--bench-result {path}: no requests")
    span = max(r.arrival_s for r in reqs)
    return reqs, (len(reqs) - 1) / span if span > 0 else math.inf


def workload_factory(cfg: PlanClusterConfig, dataset: DatasetConfig
                     ) -> tuple[Callable[[float], list[SimRequest]], list[SimRequest], float]:
    """rate -> requests, the requests at their own rate, and that rate (inf: synthetic)."""
    if cfg.bench_result:
        recorded, own_rate = recorded_requests(cfg.bench_result)

        def replay(rate: float) -> list[SimRequest]:
            scale = own_rate / rate if math.isfinite(own_rate) else 1.0
            return [SimRequest(r.arrival_s * scale, r.prompt_tokens, r.output_tokens)
                    for r in recorded]
        return replay, recorded, own_rate
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    try:
        bench_reqs = build_dataset(dataset, tokenizer, cfg.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    drawn = {len(bench_reqs): [(r.num_prompt_tokens, r.max_tokens) for r in bench_reqs]}

    def synthetic(rate: float) -> list[SimRequest]:
        n = max(dataset.num_prompts, math.ceil(rate * cfg.min_duration))
        if n not in drawn:  # the same distributions, more draws
            more = build_dataset(replace(dataset, num_prompts=n), tokenizer, cfg.seed)
            drawn[n] = [(r.num_prompt_tokens, r.max_tokens) for r in more]
        offsets = arrival_offsets(n, rate, cfg.burstiness, np.random.default_rng(cfg.seed))
        return [SimRequest(float(t), max(1, p), max(1, m))
                for t, (p, m) in zip(offsets, drawn[n], strict=True)]
    sample = [SimRequest(0.0, max(1, p), max(1, m)) for p, m in drawn[len(bench_reqs)]]
    return synthetic, sample, math.inf


def default_rates(times: StepTimes, requests: list[SimRequest], num_devices: int) -> list[float]:
    """8 rates up to 1.5x what the devices could serve if each prefilled and decoded its share:
    per request, its prefill plus its output tokens' share of full-batch decode steps."""
    mean_prompt = sum(r.prompt_tokens for r in requests) / len(requests)
    mean_output = sum(r.output_tokens for r in requests) / len(requests)
    batch = times.profile.engine.max_num_seqs
    per_token = times.step_s(0, 0, batch, batch * (mean_prompt + mean_output / 2)) / batch
    per_request = times.prefill_s(mean_prompt) + mean_output * per_token
    top = 1.5 * num_devices / max(per_request, 1e-6)
    return [float(f"{top * k / 8:.2g}") for k in range(1, 9)]


def _dataset_config(args: argparse.Namespace) -> DatasetConfig:
    for flag in ("input_len", "output_len"):
        value = getattr(args, flag)
        try:
            if value is not None:
                LengthDist.parse(value)
        except ValueError as e:
            raise ConfigError(f"--{flag.replace('_', '-')}: {e}") from None
    try:
        return dataclass_from_args(DatasetConfig, args)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def cmd_plan_cluster(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(PlanClusterConfig, args)
    dataset = _dataset_config(args)
    try:
        profile = Profile.load(cfg.profile)
        times = StepTimes(profile, cfg.step_overhead)
        transport = cfg.transport or ("nccl" if "nccl" in times.measured_transports()
                                      else "stream")
        base = ClusterSpec(1, 1, "remote", cfg.slo_ttft, cfg.slo_tpot, transport,
                           cfg.remote_overhead, cfg.local_overhead, cfg.kv_capacity_tokens,
                           cfg.transfer_gbps, online_fits=cfg.online_fits,
                           step_noise=cfg.step_noise, prefill_noise=cfg.prefill_noise)
        workload, sample, _ = workload_factory(cfg, dataset)
        rates = parse_rates(cfg.rates) if cfg.rates else default_rates(times, sample,
                                                                       cfg.num_devices)
        specs = configurations(cfg.num_devices, base, cfg.placements.split(","))
        results = [run_config(profile, s, rates, workload, cfg.attainment, times, draws=cfg.draws)
                   for s in specs]
    except (ProfileError, SimulationError) as e:
        raise ConfigError(str(e)) from None
    best = recommend(results)
    engine_args = [*profile.meta.get("engine_args", []), *shlex.split(cfg.serve_args)]
    doc = report.as_dict(results, best, engine_args, cfg.attainment)
    if cfg.out:
        doc_out = {"plan_command": shlex.join(["pdserve", *sys.argv[1:]]), "profile": cfg.profile,
                   "device": profile.meta.get("device"), "workload": vars(dataset) | {
                       "bench_result": cfg.bench_result, "seed": cfg.seed}, **doc}
        Path(cfg.out).write_text(json.dumps(doc_out, indent=1))
    if cfg.json:
        print(json.dumps(doc, indent=1))
    else:
        print(report.text(results, best, engine_args, cfg.attainment))
    if args.plot:
        _plot(results, args.plot, cfg.attainment)
    return 0


def _plot(results: list, path: str, target: float) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install 'pdserve[bench]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot([p.rate for p in r.points], [100 * p.attainment for p in r.points], marker="o",
                label=r.spec.name)
    ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)",
           title="predicted by pdserve plan cluster")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)
