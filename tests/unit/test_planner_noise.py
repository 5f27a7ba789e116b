"""The simulator's step noise (a seeded log-normal factor on every step) and its online cost
models (one per worker, fed the worker's warm-up and then its steps, a heartbeat late)."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest

from planner.profile import StepTimes
from planner.search import run_config
from planner.servers import SimRequest
from planner.simulator import ClusterSpec, Simulation, SimulationError, simulate
from planner.warmup import warmup_room, warmup_steps
from tests.unit.planner_fixtures import small_profile


def test_step_noise_is_a_seeded_log_normal_factor_of_median_one() -> None:
    sim = Simulation(small_profile(), ClusterSpec(1, 1, step_noise=0.2, prefill_noise=0.05,
                                                  noise_seed=3))
    for decode_seqs, sigma in ((1, 0.2), (8, 0.2), (0, 0.05)):
        logs = [math.log(sim._noise(decode_seqs)) for _ in range(4000)]
        assert abs(statistics.fmean(logs)) < 0.01
        assert statistics.stdev(logs) == pytest.approx(sigma, rel=0.05)
    quiet_prefill = Simulation(small_profile(), ClusterSpec(1, 1, step_noise=0.2))
    assert {quiet_prefill._noise(0) for _ in range(10)} == {1.0}
    reqs = [SimRequest(0.1 * i, 256, 20) for i in range(10)]
    spec = ClusterSpec(1, 1, step_noise=0.2, noise_seed=3)
    assert simulate(small_profile(), spec, reqs) == simulate(small_profile(), spec, reqs)
    assert simulate(small_profile(), spec, reqs) != simulate(
        small_profile(), replace(spec, noise_seed=4), reqs)


def test_a_noisy_decode_averages_to_the_profiles_step_times_mean() -> None:
    """199 decode steps of 20 ms, each times a log-normal factor of sigma 0.2: the TPOT is
    their mean, 20 ms x exp(sigma^2 / 2) (the factor's mean), within the draws' error."""
    (out,) = simulate(small_profile(), ClusterSpec(1, 1, step_noise=0.2),
                      [SimRequest(0.0, 64, 200)])
    assert out.tpot_s == pytest.approx(0.02 * math.exp(0.02), rel=0.04)
    assert out.tpot_s != pytest.approx(0.02, rel=1e-6)


def test_noise_draws_are_scored_together() -> None:
    """With noise, each rate is simulated `draws` times and its percentiles and attainment
    are over all of them; without noise one draw is all there is."""
    reqs = [SimRequest(0.2 * i, 512, 30) for i in range(20)]
    spec = ClusterSpec(1, 1, slo_ttft_s=0.6, slo_tpot_s=0.021, step_noise=0.3)
    result = run_config(small_profile(), spec, [5.0], lambda rate: reqs, 0.9, draws=6)
    (point,) = result.points
    singles = [run_config(small_profile(), replace(spec, noise_seed=k), [5.0],
                          lambda rate: reqs, 0.9, draws=1).points[0] for k in range(6)]
    assert point.num_requests == 20 and point.num_remote == 20
    assert point.attainment == pytest.approx(statistics.fmean(p.attainment for p in singles))
    assert len({p.attainment for p in singles}) > 1  # the draws differ
    quiet = replace(spec, step_noise=0.0)
    assert run_config(small_profile(), quiet, [5.0], lambda rate: reqs, 0.9, draws=6).points \
        == run_config(small_profile(), quiet, [5.0], lambda rate: reqs, 0.9, draws=1).points


def test_bad_noise_is_a_typed_error() -> None:
    with pytest.raises(SimulationError, match="step noise"):
        ClusterSpec(1, 1, step_noise=-0.1)
    with pytest.raises(SimulationError, match="step noise"):
        ClusterSpec(1, 1, step_noise=math.nan)
    with pytest.raises(SimulationError, match="step noise"):
        ClusterSpec(1, 1, prefill_noise=2.5)
    with pytest.raises(SimulationError, match="draws"):
        run_config(small_profile(), ClusterSpec(1, 1, step_noise=0.2), [1.0],
                   lambda rate: [SimRequest(0.0, 16, 2)], 0.9, draws=0)


def test_online_models_start_from_the_warm_up_and_see_steps_a_heartbeat_late() -> None:
    """The prefill of request 0 (1024 tokens, 1.024 s) ends at 1.024 s; its heartbeat reaches
    the proxy at 1.5 s: a request arriving at 1.4 s is placed on the warm-up alone, one at
    1.6 s also on that step."""
    profile = small_profile()
    times = StepTimes(profile)
    warm = warmup_steps(times, 2048, warmup_room(4096, 100_000))
    spec = ClusterSpec(1, 1, online_fits=True)
    for second, seen in ((1.4, 0), (1.6, 1)):
        sim = Simulation(profile, spec)
        sim.run([SimRequest(0.0, 1024, 2), SimRequest(second, 16, 2)])
        assert sim.models[0].num_observed == len(warm) + seen
    # the warm-up's steps are the profile's: the fit predicts its decode and prefill steps
    coef = Simulation(profile, spec).models[1].coefficients
    assert coef.step_seconds(0, 1, 130) == pytest.approx(times.decode_s(1, 130), rel=0.1)
    assert coef.step_seconds(256, 0, 256) == pytest.approx(times.prefill_s(256), rel=0.1)


def test_online_fits_follow_the_workers_own_steps() -> None:
    """A decode worker that runs only batch-1 decodes fits those, not the profile's average
    over every batch (the profile's fit is what every worker uses without online fits)."""
    profile = small_profile()
    reqs = [SimRequest(3.0 * i, 64, 100) for i in range(8)]
    sim = Simulation(profile, ClusterSpec(1, 1, online_fits=True))
    sim.run(reqs)
    online = sim.models[1].coefficients.step_seconds(0, 1, 128)
    assert online == pytest.approx(0.02, rel=0.05)
    assert sim.models[1].num_observed > 500
