"""The search: every configuration of N devices over a rate sweep, scored as `pdserve bench`
scores a measured sweep.

Configurations (one whole device per worker): `xPyD` for every x + y = N with remote placement
and with adaptive placement, and `colocated-xN`. At each rate the workload's requests (their
lengths fixed, arrivals drawn for that rate) are simulated; attainment is the share of requests
with TTFT <= SLO and TPOT <= SLO (a one-token request has no TPOT), percentiles are numpy's
linear ones, and goodput is DistServe's: the highest rate up to which every rate swept reaches
the target attainment (bench/metrics.py `goodput_from_curve`, mirrored here: the planner
does not import bench/). The recommendation is the configuration with the highest goodput,
then the highest mean attainment over the sweep, then the fewest prefill workers.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from planner.profile import Profile, StepTimes
from planner.servers import SimRequest
from planner.simulator import (
    ClusterSpec,
    RequestOutcome,
    Simulation,
    SimulationError,
    fit_coefficients,
)


@dataclass(frozen=True)
class Point:
    rate: float
    num_requests: int
    attainment: float
    ttft_p50_s: float
    ttft_p90_s: float
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    num_remote: int


@dataclass(frozen=True)
class ConfigResult:
    spec: ClusterSpec
    points: list[Point]
    goodput: float | None  # req/s; None: the first rate already misses
    first_miss: float | None

    @property
    def mean_attainment(self) -> float:
        return sum(p.attainment for p in self.points) / max(1, len(self.points))


def percentile(values: Sequence[float], q: float) -> float:
    """numpy.percentile's default (linear) method."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def score(rate: float, outcomes: Sequence[RequestOutcome], slo_ttft_s: float,
          slo_tpot_s: float) -> Point:
    ttfts = [o.ttft_s for o in outcomes]
    tpots = [t for o in outcomes if (t := o.tpot_s) is not None]
    met = sum(1 for o in outcomes if o.ttft_s <= slo_ttft_s
              and (o.tpot_s is None or o.tpot_s <= slo_tpot_s))
    return Point(rate, len(outcomes), met / max(1, len(outcomes)), percentile(ttfts, 50),
                 percentile(ttfts, 90), percentile(tpots, 50) if tpots else None,
                 percentile(tpots, 90) if tpots else None,
                 sum(1 for o in outcomes if o.placement == "remote"))


def goodput(points: Sequence[Point], target: float) -> tuple[float | None, float | None]:
    best = None
    for p in sorted(points, key=lambda p: p.rate):
        if p.attainment < target:
            return best, p.rate
        best = p.rate
    return best, None


def configurations(num_devices: int, base: ClusterSpec,
                   placements: Sequence[str] = ("remote", "adaptive")) -> list[ClusterSpec]:
    """Every split of `num_devices` workers, and colocated replicas."""
    if num_devices < 1:
        raise ValueError(f"--num-devices must be >= 1, got {num_devices}")
    specs = [replace(base, num_prefill=x, num_decode=num_devices - x, placement=placement)
             for x in range(1, num_devices) for placement in placements]
    return [*specs, replace(base, num_prefill=0, num_decode=num_devices, placement="local")]


def run_config(profile: Profile, spec: ClusterSpec, rates: Sequence[float],
               workload: Callable[[float], list[SimRequest]], target: float,
               times: StepTimes | None = None, slo_ttft_s: float | None = None,
               slo_tpot_s: float | None = None, draws: int = 1) -> ConfigResult:
    """`spec`'s SLOs steer its placement rule; requests are scored against `slo_*_s` when
    given (a measured run whose servers kept their default SLOs), else against the spec's.
    With step noise, each rate is simulated `draws` times (noise seeds spec.noise_seed + k)
    and scored over all of them: the prediction is the noise's distribution, not one draw."""
    if draws < 1:
        raise SimulationError(f"draws must be >= 1, got {draws}")
    times = times or StepTimes(profile)
    coef = fit_coefficients(profile)
    ttft, tpot = slo_ttft_s or spec.slo_ttft_s, slo_tpot_s or spec.slo_tpot_s
    seeds = [spec.noise_seed + k for k in range(draws if spec.is_noisy else 1)]
    points = []
    for rate in rates:
        requests = workload(rate)
        outcomes = [o for seed in seeds for o in Simulation(
            profile, replace(spec, noise_seed=seed), times, coef).run(requests)]
        points.append(replace(score(rate, outcomes, ttft, tpot), num_requests=len(requests),
                              num_remote=round(sum(o.placement == "remote" for o in outcomes)
                                               / len(seeds))))
    best, miss = goodput(points, target)
    return ConfigResult(spec, points, best, miss)


def recommend(results: Sequence[ConfigResult]) -> ConfigResult:
    return max(results, key=lambda r: (r.goodput or 0.0, r.mean_attainment,
                                       -r.spec.num_prefill, r.spec.placement == "remote"))


def serve_command(spec: ClusterSpec, engine_args: Sequence[str] = ()) -> str:
    """The `pdserve serve` command line that runs `spec` (flags of deploy/local_launcher.py
    ServeConfig and worker/config.py KvTransportConfig)."""
    if spec.is_colocated:
        args = ["--colocated", "--decode", str(spec.num_decode)]
    else:
        args = ["--prefill", str(spec.num_prefill), "--decode", str(spec.num_decode),
                "--placement", spec.placement]
        if spec.transport == "nccl":
            args += ["--transport", "nccl"]
        elif spec.transport == "frames":
            args += ["--kv-payload", "frames"]
    args += ["--slo-ttft", f"{spec.slo_ttft_s:g}s", "--slo-tpot", f"{spec.slo_tpot_s:g}s"]
    return shlex.join(["pdserve", "serve", *args, *engine_args])
