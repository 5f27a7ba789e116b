"""Rendering of a search: a text table per configuration and the recommendation, or a JSON-able
dict with the same numbers (rates in req/s, times in seconds)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from planner.search import ConfigResult, serve_command


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def text(results: Sequence[ConfigResult], best: ConfigResult, engine_args: Sequence[str],
         target: float) -> str:
    spec0 = best.spec
    lines = [f"SLO: TTFT <= {spec0.slo_ttft_s:g} s, TPOT <= {spec0.slo_tpot_s * 1000:g} ms, "
             f"attainment >= {target:.0%}; {spec0.num_devices} devices, KV over "
             f"{spec0.transport}. Predictions of the simulator, not measurements.", ""]
    lines += ["| config | goodput (req/s) | per device | rate: attainment, TTFT p50/p90 ms, "
              "TPOT p50/p90 ms |", "| --- | ---: | ---: | --- |"]
    for r in results:
        good = "< first rate" if r.goodput is None else f"{r.goodput:g}"
        per = "-" if r.goodput is None else f"{r.goodput / r.spec.num_devices:.3g}"
        cells = "; ".join(f"{p.rate:g}: {p.attainment:.0%}, {_ms(p.ttft_p50_s)}/"
                          f"{_ms(p.ttft_p90_s)}, {_ms(p.tpot_p50_s)}/{_ms(p.tpot_p90_s)}"
                          for p in r.points)
        lines.append(f"| {r.spec.name} | {good} | {per} | {cells} |")
    colocated = [r for r in results if r.spec.is_colocated]
    if best.goodput is None:
        lines += ["", "no configuration meets the SLO at the lowest rate swept: lower --rates, "
                  "relax the SLOs or add devices.",
                  f"closest: {best.spec.name}: {serve_command(best.spec, engine_args)}"]
        return "\n".join(lines)
    lines += ["", f"recommended: {best.spec.name}, predicted goodput "
              f"{best.goodput or 0:g} req/s ({(best.goodput or 0) / best.spec.num_devices:.3g} "
              "per device)" + (f"; colocated-x{colocated[0].spec.num_decode}: "
                               f"{colocated[0].goodput or 0:g} req/s" if colocated else ""),
              f"run it: {serve_command(best.spec, engine_args)}"]
    return "\n".join(lines)


def as_dict(results: Sequence[ConfigResult], best: ConfigResult,
            engine_args: Sequence[str], target: float) -> dict[str, Any]:
    return {"target_attainment": target,
            "configs": [{"name": r.spec.name, "spec": asdict(r.spec), "goodput": r.goodput,
                         "first_miss": r.first_miss,
                         "goodput_per_device": (r.goodput or 0.0) / r.spec.num_devices,
                         "command": serve_command(r.spec, engine_args),
                         "points": [asdict(p) for p in r.points]} for r in results],
            "recommended": best.spec.name,
            "command": serve_command(best.spec, engine_args)}
