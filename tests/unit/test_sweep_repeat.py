"""bench/sweep_repeat.py: two measured runs of one sweep side by side, the p90's bootstrap
interval, and a refusal to compare runs of other workloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.sweep_repeat import SweepMismatch, bootstrap_p90, compare, load_run, main


def _sweep(ttfts: list[float], tpot: float, rate: float = 0.5, output_len: str = "48",
           name: str = "1p1d") -> dict[str, Any]:
    reqs = [{"ttft_s": t, "tpot_s": tpot, "error": None} for t in ttfts]
    summary = {"attainment": 1.0, "ttft": {"p90": float(np.percentile(ttfts, 90))},
               "tpot": {"p90": tpot}}
    return {"dataset": {"input_len": "128", "output_len": output_len},
            "load": {"seed": 0, "base_url": "http://127.0.0.1:1234"},
            "slo": {"ttft_s": 2.0, "tpot_s": 0.15, "attainment": 0.9},
            "configs": [{"name": name, "points": [{"request_rate": rate, "summary": summary,
                                                   "requests": reqs}]}]}


def _write(tmp: Path, name: str, sweep: dict[str, Any]) -> Path:
    path = tmp / name
    path.write_text(json.dumps(sweep))
    return path


def test_bootstrap_interval_holds_the_p90_and_narrows_with_more_requests() -> None:
    rng = np.random.default_rng(1)
    few, many = rng.lognormal(0, 0.3, 40), rng.lognormal(0, 0.3, 4000)
    lo, hi = bootstrap_p90(few)
    assert lo <= np.percentile(few, 90) <= hi
    lo2, hi2 = bootstrap_p90(many)
    assert (hi2 - lo2) < (hi - lo) / 4
    assert bootstrap_p90([1.0]) is None
    assert bootstrap_p90([1.0, 1.0]) == (1.0, 1.0)


def test_repeats_are_compared_point_by_point(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.json", _sweep([0.4] * 30 + [1.0] * 10, 0.10))
    b = _write(tmp_path, "b.json", _sweep([0.4] * 30 + [1.2] * 10, 0.10))
    c = _write(tmp_path, "c.json", _sweep([0.4] * 40, 0.10, name="colocated-x2"))
    _, run_a = load_run([a, c])  # a run of two one-configuration sweeps
    _, run_b = load_run([b])
    rows = compare([run_a, run_b])
    assert [(r["config"], r["rate"]) for r in rows] == [("1p1d", 0.5)]  # only what both measured
    assert rows[0]["diff_pct"]["ttft"] == [pytest.approx(20.0)]
    assert rows[0]["diff_pct"]["tpot"] == [pytest.approx(0.0)]
    assert rows[0]["within"]
    worse = _write(tmp_path, "w.json", _sweep([0.4] * 30 + [1.3] * 10, 0.10))
    assert not compare([run_a, load_run([worse])[1]])[0]["within"]  # +30 %


def test_other_workloads_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path, "a.json", _sweep([0.4] * 10, 0.1))
    other = _write(tmp_path, "o.json", _sweep([0.4] * 10, 0.1, output_len="256",
                                              name="colocated-x2"))
    with pytest.raises(SweepMismatch):
        load_run([a, other])
    assert main(["--run", str(a), "--run", str(other)]) == 2
    assert "SweepMismatch" in capsys.readouterr().err
    out = tmp_path / "r.md"
    assert main(["--run", str(a), "--run", str(a), "--out", str(out)]) == 0
    assert "1 of 1" in out.read_text()
