"""bench.placement_offline: the simulator on the placement sweeps' workloads writes its table."""

from __future__ import annotations

import json
from pathlib import Path

from bench.placement_offline import main


def test_it_writes_attainment_and_goodput_per_configuration(tmp_path: Path) -> None:
    sweep = "bench/results/placement_cpu_interference_2026-12-06.json"
    assert main(["--sweeps", sweep, "--extra-seeds", "1", "--tag", "t",
                 "--out-dir", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("placement_offline_t_*.json")
    doc = json.loads(js.read_text())
    (v,) = doc["sweeps"]
    assert [c["name"] for c in v["configs"]] == ["1p1d", "colocated-x2", "adaptive"]
    for c in v["configs"]:
        assert [r["seed"] for r in c["runs"]] == [0, 100]
        assert all(len(r["attainment"]) == len(v["rates"]) for r in c["runs"])
    one_p = v["configs"][0]["runs"][0]
    assert one_p["num_remote"] == one_p["num_requests"]  # 1p1d: every prefill remote
    assert "| adaptive |" in js.with_suffix(".md").read_text()
