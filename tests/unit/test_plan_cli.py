"""`pdserve plan cluster` end to end on a small profile, `pdserve plan` (the KV plan) unchanged,
parse errors that name the flag, and `pdserve profile` on the real SmolLM2 in bounded time."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.cli import build_parser, main
from deploy.local_launcher import ServeConfig
from engine.config import EngineConfig
from planner.profile import Profile
from tests.unit.planner_fixtures import small_profile
from worker.args import dataclass_from_args

WORKLOAD = ["--input-len", "uniform:200:400", "--output-len", "16", "--num-prompts", "30",
            "--rates", "0.5,1,2,4"]


@pytest.fixture
def profile_path(tmp_path: Path) -> str:
    path = tmp_path / "profile.json"
    path.write_text(small_profile().to_json())
    return str(path)


def test_plan_cluster_recommends_a_runnable_serve_command(
        profile_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plan", "cluster", "--profile", profile_path, "--num-devices", "3",
               "--slo-ttft", "1s", "--slo-tpot", "60ms", *WORKLOAD])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("1p2d", "2p1d", "1p2d-adaptive", "colocated-x3"):
        assert f"| {name} |" in out
    (line,) = [x for x in out.splitlines() if x.startswith("run it: ")]
    argv = shlex.split(line.removeprefix("run it: "))
    assert argv[:2] == ["pdserve", "serve"]
    args = build_parser().parse_args(argv[1:])  # the real serve parser takes it
    serve = dataclass_from_args(ServeConfig, args)
    engine = dataclass_from_args(EngineConfig, args)
    assert serve.colocated or serve.prefill + serve.decode == 3
    assert serve.colocated == (not serve.prefill) or serve.decode == 3
    assert (serve.slo_ttft, serve.slo_tpot) == (1.0, 0.06)
    assert engine.max_model_len == 2048  # the profile's engine flags travel with it


def test_plan_cluster_json(profile_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "cluster", "--profile", profile_path, "--num-devices", "2",
                 "--json", *WORKLOAD]) == 0
    doc = json.loads(capsys.readouterr().out)
    names = [c["name"] for c in doc["configs"]]
    assert names == ["1p1d", "1p1d-adaptive", "colocated-x2"]
    assert doc["recommended"] in names
    for c in doc["configs"]:
        assert [p["rate"] for p in c["points"]] == [0.5, 1, 2, 4]
        assert all(0 <= p["attainment"] <= 1 for p in c["points"])
    # a per-step serving overhead makes every predicted TPOT longer by it
    assert main(["plan", "cluster", "--profile", profile_path, "--num-devices", "2",
                 "--json", "--step-overhead", "7ms", *WORKLOAD]) == 0
    slower = json.loads(capsys.readouterr().out)
    for c, s in zip(doc["configs"], slower["configs"], strict=True):
        for p, q in zip(c["points"], s["points"], strict=True):
            if p["tpot_p50_s"] is not None:
                assert q["tpot_p50_s"] > p["tpot_p50_s"] + 0.005
    # step noise (3 draws per rate) and online cost fits: the same configurations, noisier
    # TPOTs, reproducible
    noisy = ["plan", "cluster", "--profile", profile_path, "--num-devices", "2", "--json",
             "--step-noise", "0.3", "--prefill-noise", "0.1", "--draws", "2", "--online-fits",
             *WORKLOAD[:-1], "0.5,1"]
    assert main(noisy) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(noisy) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert [c["name"] for c in first["configs"]] == names
    assert first["configs"][0]["points"] != doc["configs"][0]["points"][:2]


def test_plain_plan_still_prints_the_kv_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--max-model-len", "2048", "--kv-cache-memory", "256MiB"]) == 0
    assert capsys.readouterr().out.startswith("KV cache: ")


@pytest.mark.parametrize("argv, flag", [
    (["--num-devices", "two"], "--num-devices"),
    (["--slo-ttft", "soon"], "--slo-ttft"),
    (["--attainment", "1.5"], "--attainment"),
    (["--rates", "1,fast"], "--rates"),
    (["--input-len", "uniform:9:3"], "uniform"),
    (["--placements", "remote,elsewhere"], "--placements"),
    (["--num-devices", "0"], "--num-devices"),
    (["--step-overhead", "-3ms"], "--step-overhead"),
    (["--step-noise", "-0.1"], "--step-noise"),
    (["--draws", "0"], "--draws"),
    (["--prefill-noise", "3"], "--prefill-noise"),
])
def test_parse_errors_name_the_flag(profile_path: str, argv: list[str], flag: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    try:
        rc = main(["plan", "cluster", "--profile", profile_path, *argv])
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == 2
    assert flag in capsys.readouterr().err


def test_missing_profile_flag_and_bad_profile_file(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["plan", "cluster", "--num-devices", "2"])
    assert "--profile" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "engine": {}}')
    assert main(["plan", "cluster", "--profile", str(bad)]) == 2
    assert "profile" in capsys.readouterr().err


def test_profile_on_smollm2_is_bounded_and_valid(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "profile", "--out", str(out), "--budget-s", "6",
         "--no-transfers", "--max-model-len", "512", "--kv-cache-memory", "64MiB"],
        capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert elapsed < 90, f"profile took {elapsed:.0f} s with --budget-s 6"
    assert "prefill" in proc.stderr  # progress lines
    profile = Profile.load(str(out))
    assert profile.prefill and profile.decode and profile.steps
    assert profile.kv_bytes_per_token == 30 * 3 * 64 * 2 * 4  # fp32 KV on CPU: 45 KiB
    assert profile.meta["model_shape"]["num_layers"] == 30
    assert {"device", "dtype", "versions", "date"} <= set(profile.meta)
    assert "not measured" in profile.transfers["stream"]


def test_plan_cluster_replays_a_bench_result(profile_path: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--bench-result: the recorded arrivals and lengths, rescaled to each rate swept."""
    result = tmp_path / "bench.json"
    result.write_text(json.dumps({"requests": [
        {"scheduled_s": i * 0.5, "prompt_tokens": 300, "completion_tokens": 20,
         "expected_prompt_tokens": 300, "expected_output_tokens": 20} for i in range(20)]}))
    assert main(["plan", "cluster", "--profile", profile_path, "--num-devices", "2",
                 "--bench-result", str(result), "--rates", "2,8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    points = doc["configs"][0]["points"]
    assert [p["num_requests"] for p in points] == [20, 20]
    assert points[0]["attainment"] >= points[1]["attainment"]
    bad = tmp_path / "not_bench.json"
    bad.write_text('{"configs": []}')
    assert main(["plan", "cluster", "--profile", profile_path, "--bench-result", str(bad)]) == 2
    assert "--bench-result" in capsys.readouterr().err


def test_synthetic_rates_run_long_enough_for_a_steady_state(profile_path: str) -> None:
    """A burst of --num-prompts that the batches absorb says nothing of a rate: each rate gets
    at least --min-duration of arrivals (more draws from the same distributions)."""
    from deploy.plan_cli import (
        PlanClusterConfig,
        _dataset_config,
        default_rates,
        workload_factory,
    )
    from planner.profile import StepTimes

    def factory(*flags: str) -> tuple:
        args = build_parser().parse_args(["plan", "cluster", "--profile", profile_path,
                                          "--num-devices", "2", *WORKLOAD, *flags])
        return workload_factory(dataclass_from_args(PlanClusterConfig, args),
                                _dataset_config(args))
    at, sample, _ = factory("--min-duration", "20s")
    assert len(sample) == 30
    assert len(at(0.5)) == 30  # 10 s of arrivals need fewer than --num-prompts
    reqs = at(4.0)
    assert len(reqs) == 80 and reqs[-1].arrival_s > 15.0
    assert all(200 <= r.prompt_tokens <= 400 and r.output_tokens == 16 for r in reqs)
    assert len(factory("--min-duration", "0")[0](4.0)) == 30
    # default rates count decode work too: longer outputs, lower rates
    times = StepTimes(small_profile())
    short = default_rates(times, sample, 2)
    longer = [r.__class__(r.arrival_s, r.prompt_tokens, 400) for r in sample]
    assert max(default_rates(times, longer, 2)) < max(short) / 2
