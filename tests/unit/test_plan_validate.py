"""bench/plan_validate.py simulates what the measured sweeps sent: the same requests per rate
(their token totals equal the server-counted ones in the sweep files) on the same serve flags."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from bench.plan_validate import spec_of, workload

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


@pytest.mark.parametrize("name", ["placement_cpu_prefill_heavy_2026-12-06.json",
                                  "sweep_h200x2_2026-11-22.json"])
def test_workload_reproduces_the_measured_requests(name: str) -> None:
    sweep = json.loads((RESULTS / name).read_text())
    at = workload(sweep)
    for rate, point in zip(sweep["request_rates"], sweep["configs"][0]["points"], strict=True):
        reqs = at(rate)
        assert sum(r.prompt_tokens for r in reqs) == point["summary"]["prompt_tokens"]
        assert sum(r.output_tokens for r in reqs) == point["summary"]["output_tokens"]
        assert reqs[0].arrival_s == 0.0
        assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(reqs))


def test_serve_flags_become_cluster_specs() -> None:
    s = spec_of("pdserve serve --prefill 1 --decode 1 --transport nccl", "--max-model-len 8192",
                205.8)
    assert (s.name, s.transport, s.transfer_gbps) == ("1p1d-adaptive", "nccl", 205.8)
    s = spec_of("pdserve serve --prefill 1 --decode 1", "", 0.0, unnamed_placement="remote")
    assert s.name == "1p1d"
    s = spec_of("pdserve serve --colocated --decode 2", "", 0.0)
    assert (s.name, s.placement, s.slo_tpot_s, s.chunk_caps) == ("colocated-x2", "local", 0.05,
                                                                 True)
    # a sweep older than placement: its colocated workers prefilled in the engine's budget
    s = spec_of("pdserve serve --colocated --decode 2", "", 0.0, unnamed_placement="remote")
    assert (s.name, s.chunk_caps) == ("colocated-x2", False)
    s = spec_of("pdserve serve --prefill 2 --decode 1 --placement remote --slo-tpot 40ms", "", 0)
    assert (s.name, s.slo_tpot_s) == ("2p1d", 0.04)


def test_calibration_fits_the_overheads_on_one_point() -> None:
    from bench.plan_validate import compare, serving_overhead
    from planner.profile import Profile

    profile = Profile.load(str(RESULTS / "profile_cpu_2026-12-06.json"))
    sweep = json.loads((RESULTS / "placement_cpu_interference_2026-12-06.json").read_text())
    overhead, step = serving_overhead(profile, sweep, "1p1d", 0.0)
    assert 0.0 < overhead < 0.5 and 0.0 < step < 0.05
    bare, fitted = compare(profile, sweep, 0.0), compare(profile, sweep, 0.0, "", overhead)
    row0, row1 = bare["configs"][0]["rows"][0], fitted["configs"][0]["rows"][0]
    assert row1["ttft_p90_pred"] == pytest.approx(row0["ttft_p90_pred"] + overhead, abs=1e-6)
    # the per-step overhead brings the calibration point's predicted TPOT p50 to the measured
    measured = sweep["configs"][0]["points"][0]["summary"]["tpot"]["median"]
    both = compare(profile, sweep, 0.0, "", overhead, step)["configs"][0]["rows"][0]
    assert both["tpot_p90_pred"] > row1["tpot_p90_pred"]
    from bench.plan_validate import spec_of as spec
    from planner.profile import StepTimes
    from planner.search import run_config
    c = sweep["configs"][0]
    p50 = run_config(profile, spec(c["server"], sweep["serve_args"], 0.0),
                     [sweep["request_rates"][0]], workload(sweep), 0.9, StepTimes(profile, step),
                     sweep["slo"]["ttft_s"], sweep["slo"]["tpot_s"]).points[0].tpot_p50_s
    assert p50 == pytest.approx(measured, rel=0.05)
    with pytest.raises(SystemExit, match="no such configuration"):
        serving_overhead(profile, sweep, "4p4d", 0.0)


@pytest.mark.parametrize("flags", [["--draws", "0"], ["--step-noise", "-1"],
                                   ["--prefill-noise", "3"]])
def test_bad_noise_flags_are_refused(flags: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from bench.plan_validate import main
    with pytest.raises(SystemExit) as e:
        main(["--profile", "bench/results/profile_cpu_2026-12-06_night.json", *flags])
    assert e.value.code == 2 and "--draws must be >= 1" in capsys.readouterr().err


def test_each_sweep_is_predicted_from_its_own_profile(tmp_path: Path) -> None:
    """--profiles: sweep i against profile i, the profiles' drift side by side, and an extra
    profile (taken after the last sweep) in the drift table only."""
    from bench.plan_validate import main
    sweep = str(RESULTS / "placement_cpu_interference_2026-12-06.json")
    fast, slow = (str(RESULTS / f"profile_cpu_2026-12-06_{n}.json") for n in ("night", "night2"))
    assert main(["--sweeps", sweep, sweep, "--profiles", fast, slow, fast, "--out-dir",
                 str(tmp_path), "--tag", "t"]) == 0
    doc = json.loads(next(tmp_path.glob("plan_validation_t_*.json")).read_text())
    assert [v["profile"] for v in doc["validations"]] == [fast, slow]
    assert [d["profile"] for d in doc["drift"]] == [fast, slow]  # each profile once
    assert doc["drift"][0]["vs_first"] == [1.0, 1.0, 1.0]
    decode_ratio = doc["drift"][1]["vs_first"][1]
    assert decode_ratio > 1.1  # night2's decode steps were slower (README: machine drift)
    # the slower profile predicts slower decoding for the same measured sweep
    a, b = (v["configs"][0]["rows"][0]["tpot_p90_pred"] for v in doc["validations"])
    assert b > a
    md = next(tmp_path.glob("plan_validation_t_*.md")).read_text()
    assert "x the first profile" in md and "In all: goodput within one rate step" in md
    # each validated alone with its own profile gives the same rows
    one = tmp_path / "one"
    assert main(["--sweeps", sweep, "--profile", slow, "--out-dir", str(one), "--tag", "t"]) == 0
    alone = json.loads(next(one.glob("plan_validation_t_*.json")).read_text())
    assert alone["validations"][0]["configs"] == doc["validations"][1]["configs"]


@pytest.mark.parametrize("flags", [["--profiles", "a.json"],
                                   ["--profiles", "a.json", "b.json", "--profile", "c.json"]])
def test_profiles_must_pair_with_sweeps(flags: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from bench.plan_validate import main
    with pytest.raises(SystemExit) as e:
        main(["--sweeps", "x.json", "y.json", "z.json", *flags])
    assert e.value.code == 2 and "one profile per sweep" in capsys.readouterr().err


def test_a_point_is_predicted_from_the_profiles_around_it(tmp_path: Path) -> None:
    """--interpolate: a point's step times are its sweep's profile and the next one blended by
    when the point ran; the weight follows the point's time between the profiles' runs."""
    from bench.plan_validate import _taken_at, drift_weight, main, point_times
    from planner.profile import BlendedStepTimes, Profile, StepTimes
    a, b = (Profile.load(str(RESULTS / f"profile_cpu_2026-12-06_{n}.json"))
            for n in ("night", "night2"))
    t0, t1 = _taken_at(a), _taken_at(b)
    point = {"started_at": t0 + 0.25 * (t1 - t0) - 10.0,
             "requests": [{"scheduled_s": 0.0, "e2e_s": 5.0}, {"scheduled_s": 15.0, "e2e_s": 5.0}]}
    assert drift_weight(a, b, point) == pytest.approx(0.25)
    assert drift_weight(a, b, {"started_at": t1 + 999, "requests": point["requests"]}) == 1.0
    assert drift_weight(a, b, {"started_at": None}) == 0.5
    fit, times = point_times(a, b, point, 0.0)
    assert fit is a and isinstance(times, BlendedStepTimes)
    one, two = StepTimes(a), StepTimes(b)
    args = (0, 0, 4, 2400)
    assert times.step_s(*args) == pytest.approx(0.75 * one.step_s(*args) + 0.25 * two.step_s(*args))
    assert times.transfer_s("stream", 1e7) == pytest.approx(
        0.75 * one.transfer_s("stream", 1e7) + 0.25 * two.transfer_s("stream", 1e7))
    with pytest.raises(ValueError, match="blend weight"):
        BlendedStepTimes(a, b, 1.5)
    # end to end: with the same profile before and after, interpolating changes nothing
    sweep = str(RESULTS / "placement_cpu_interference_2026-12-06.json")
    night = str(RESULTS / "profile_cpu_2026-12-06_night.json")
    for tag, extra in (("plain", []), ("blend", ["--interpolate"])):
        assert main(["--sweeps", sweep, "--profiles", night, night, *extra, "--out-dir",
                     str(tmp_path), "--tag", tag]) == 0
    plain, blend = (json.loads(next(tmp_path.glob(f"plan_validation_{t}_*.json")).read_text())
                    for t in ("plain", "blend"))
    assert plain["validations"][0]["configs"] == blend["validations"][0]["configs"]
    assert blend["validations"][0]["profile_after"] == night


def test_interpolate_needs_a_profile_after_the_last_sweep(
        capsys: pytest.CaptureFixture[str]) -> None:
    from bench.plan_validate import main
    with pytest.raises(SystemExit) as e:
        main(["--sweeps", "x.json", "--profiles", "a.json", "--interpolate"])
    assert e.value.code == 2 and "one more profile than --sweeps" in capsys.readouterr().err


def test_rows_carry_the_measured_p90s_bootstrap_interval() -> None:
    """Each point's measured p90 comes with how far it moves by chance (its requests resampled),
    and a prediction is graded against that interval too."""
    from bench.plan_validate import _inside, compare
    from planner.profile import Profile

    profile = Profile.load(str(RESULTS / "profile_cpu_2026-12-07_bracket_b3.json"))
    sweep = json.loads((RESULTS / "placement_cpu_interference_2026-12-07_bracket_1p1d.json")
                       .read_text())  # a sweep that keeps its requests' records
    config = compare(profile, sweep, 0.0)["configs"][0]
    for r in config["rows"]:
        for m in ("ttft", "tpot"):
            lo, hi = r[f"{m}_p90_interval"]
            assert lo <= r[f"{m}_p90_meas"] <= hi
        assert r["inside"] == (_inside(r["ttft_p90_pred"], r["ttft_p90_interval"])
                               and _inside(r["tpot_p90_pred"], r["tpot_p90_interval"]))
    assert isinstance(config["p90_inside_interval"], bool)
    assert _inside(1.0, (0.5, 1.5)) and not _inside(2.0, (0.5, 1.5)) and _inside(None, (0, 1))
    assert _inside(1.0, None) is None  # no request records: not graded, not passed
    old = json.loads((RESULTS / "placement_cpu_interference_2026-12-06.json").read_text())
    rows = compare(Profile.load(str(RESULTS / "profile_cpu_2026-12-06.json")), old,
                   0.0)["configs"][0]["rows"]  # a sweep that kept no request records
    assert all(r["inside"] is None for r in rows)


def test_after_names_each_sweeps_later_profile(tmp_path: Path) -> None:
    """`--after` pairs each sweep with the profile taken after it when the sweeps did not run
    back to back (one re-measured later); without --interpolate it is refused."""
    from bench.plan_validate import main

    sweep = str(RESULTS / "placement_cpu_interference_2026-12-07_bracket_1p1d.json")
    before, after = (str(RESULTS / f"profile_cpu_2026-12-07_bracket_b{i}.json") for i in (3, 4))
    with pytest.raises(SystemExit):
        main(["--sweeps", sweep, "--profiles", before, "--after", after])
    assert main(["--sweeps", sweep, "--profiles", before, "--interpolate", "--after", after,
                 "--out-dir", str(tmp_path), "--tag", "t"]) == 0
    (doc,) = [json.loads(f.read_text()) for f in tmp_path.glob("plan_validation_t_*.json")]
    assert doc["validations"][0]["profile_after"] == after
    assert [Path(d["profile"]).name for d in doc["drift"]] == [Path(before).name,
                                                               Path(after).name]


def test_sim_model_flags_reach_the_cluster_spec() -> None:
    """--learn-corrections and --corun-factors change the simulated cluster (and say so)."""
    from bench.plan_validate import SimModel
    from planner.profile import CoRun

    base = spec_of("pdserve serve --prefill 1 --decode 1", "", 0.0)
    assert not SimModel().apply(base).learn_corrections and SimModel().apply(base).corun is None
    model = SimModel(learn_corrections=True, corun=CoRun.parse("1.25,1,1.08,1"))
    spec = model.apply(base)
    assert spec.learn_corrections and spec.corun == CoRun(1.25, 1.0, 1.08, 1.0)
    assert "learned" in model.describe() and "light_under_light 1.25" in model.describe()
