"""`python -m bench.cost_fit --from-json` refits a saved run's raw steps with no engine: same
fit/test split, the saved result beside the new one, a clear error for a file without steps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bench import cost_fit
from proxy.cost_model import Coefficients

GPU = Coefficients(per_step=6e-3, per_prefill_token=2.5e-5, per_decode_seq=5e-5,
                   per_prefill_step=16e-3, prefill_free_tokens=768)


def _saved_run(path: Path) -> Path:
    rng = random.Random(0)
    steps = []
    for _ in range(300):
        prefill = rng.choice([0] * 6 + [8, 200, 800, 1500])
        seqs = rng.randint(0 if prefill else 1, 12)
        context = seqs * 300 + prefill
        seconds = GPU.step_seconds(prefill, seqs, context) * (1 + rng.gauss(0, 0.02))
        steps.append([seconds, prefill, seqs, context])
    before = {"num_fit_steps": 180, "num_test_steps": 120, "coefficients": {"per_step": 0.001},
              "error_pct": {"all": {"n": 120, "median_abs": 38.4, "p90_abs": 78.1,
                                    "mean_signed": 95.1}}}
    doc = {"command": "python -m bench.cost_fit --device cuda", "model": "llama3-8b-shape",
           "device_name": "H100", "date": "2026-12-06", "result": before, "steps": steps}
    path.write_text(json.dumps(doc))
    return path


def test_from_json_refits_the_raw_steps_and_keeps_the_saved_result_as_before(
        tmp_path: Path) -> None:
    source = _saved_run(tmp_path / "cost_fit_cuda_x_2026-12-06.json")
    assert cost_fit.main(["--from-json", str(source), "--out-dir", str(tmp_path)]) == 0
    [out] = [p for p in tmp_path.glob("cost_fit_cuda_x_refit_*.json")]
    doc = json.loads(out.read_text())
    assert doc["result"]["num_fit_steps"] == 180 and doc["result"]["num_test_steps"] == 120
    assert doc["result"]["error_pct"]["all"]["median_abs"] < 5
    assert doc["before"]["error_pct"]["all"]["median_abs"] == 38.4
    text = out.with_suffix(".md").read_text()
    assert "| all | 120 |" in text and "38.4" in text and str(source) in text


def test_from_json_without_raw_steps_says_so(tmp_path: Path) -> None:
    source = tmp_path / "old.json"
    source.write_text(json.dumps({"date": "2026-11-01", "result": {}}))
    with pytest.raises(SystemExit, match="no raw \"steps\""):
        cost_fit.main(["--from-json", str(source), "--out-dir", str(tmp_path)])
