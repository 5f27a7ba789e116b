"""How far two measured runs of the same sweep differ: the ceiling on any prediction's accuracy.

    python -m bench.sweep_repeat --run A1.json,A2.json --run B1.json,B2.json [--out F.md]

Each `--run` is one measured run: a `pdserve bench sweep` result JSON, or several (comma
-separated) when each configuration was its own sweep (`BRACKET=1 bash bench/placement_sweep.sh`).
For every configuration and rate that two or more runs measured, it tables each run's
attainment, TTFT p90 and TPOT p90 with a bootstrap interval of that p90 (the requests resampled
with replacement, seeded: how much the p90 of so few requests moves by chance alone), and each
later run's p90 against the first run's (%). The planner's target (p90 within 25 % of one
measured run) cannot be met more often than two runs of the same thing agree within 25 %; the
last line counts that.

The sweeps must share the workload (`dataset` and `load`) and the SLO, or the comparison is
refused (SweepMismatch): other lengths or SLOs are another experiment, not a repeat.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LIMIT_PCT = 25.0  # the planner's p90 target (issue 15)
METRICS = (("ttft", "ttft_s"), ("tpot", "tpot_s"))


class SweepMismatch(ValueError):
    """Two runs that are not repeats of one experiment (workload or SLO differ)."""


@dataclass(frozen=True)
class Measured:
    """One configuration at one rate, in one run."""

    attainment: float
    p90: dict[str, float | None]  # "ttft"/"tpot" -> the summary's p90 (s)
    interval: dict[str, tuple[float, float] | None]  # the p90's bootstrap interval (s)


def bootstrap_p90(values: Sequence[float], reps: int = 2000, level: float = 0.9,
                  seed: int = 0) -> tuple[float, float] | None:
    """The central `level` interval of the p90 of `values` resampled with replacement
    (numpy's linear-interpolated percentile, as `bench.metrics.Stats`)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    p90s = np.percentile(x[rng.integers(0, x.size, size=(reps, x.size))], 90, axis=1)
    lo, hi = np.percentile(p90s, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def measured(point: dict[str, Any]) -> Measured:
    s = point["summary"]
    ok = [r for r in point.get("requests", []) if not r.get("error")]
    return Measured(attainment=s["attainment"],
                    p90={m: (s.get(m) or {}).get("p90") for m, _ in METRICS},
                    interval={m: bootstrap_p90([r.get(key) for r in ok]) for m, key in METRICS})


# what makes two sweeps one experiment: the requests sent (not where they were sent)
LOAD_KEYS = ("endpoint", "burstiness", "max_concurrency", "temperature", "ignore_eos", "seed")


def _identity(sweep: dict[str, Any]) -> tuple[str, str]:
    load = {k: (sweep.get("load") or {}).get(k) for k in LOAD_KEYS}
    return (json.dumps([sweep.get("dataset"), load], sort_keys=True),
            json.dumps(sweep.get("slo"), sort_keys=True))


def load_run(paths: Sequence[Path]) -> tuple[tuple[str, str], dict[tuple[str, float], Measured]]:
    """One run's points by (configuration, rate), and the identity its sweeps share."""
    points: dict[tuple[str, float], Measured] = {}
    ident: tuple[str, str] | None = None
    for path in paths:
        sweep = json.loads(path.read_text())
        this = _identity(sweep)
        if ident is not None and this != ident:
            raise SweepMismatch(f"{path}: another workload or SLO than the run's other sweeps")
        ident = this
        for c in sweep["configs"]:
            for p in c["points"]:
                points[(c["name"], float(p["request_rate"]))] = measured(p)
    if ident is None:
        raise SweepMismatch("a run needs at least one sweep")
    return ident, points


def _pct(x: float | None, ref: float | None) -> float | None:
    return None if x is None or not ref else 100.0 * (x - ref) / ref


def compare(runs: Sequence[dict[tuple[str, float], Measured]]) -> list[dict[str, Any]]:
    """Per (configuration, rate) measured by two or more runs: each run's numbers and each later
    run's p90 difference (%) from the first run that measured it."""
    keys = sorted({k for run in runs for k in run})
    rows = []
    for key in keys:
        seen = [(i, run[key]) for i, run in enumerate(runs) if key in run]
        if len(seen) < 2:
            continue
        first = seen[0][1]
        diffs = {m: [_pct(m_.p90[m], first.p90[m]) for _, m_ in seen[1:]] for m, _ in METRICS}
        rows.append({"config": key[0], "rate": key[1], "runs": [i for i, _ in seen],
                     "measured": [m_ for _, m_ in seen], "diff_pct": diffs,
                     "within": all(d is not None and abs(d) <= LIMIT_PCT
                                   for ds in diffs.values() for d in ds)})
    return rows


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def fmt_interval(iv: Sequence[float] | None) -> str:
    """" [lo-hi]" in ms (a JSON round trip makes the tuple a list)."""
    return "" if iv is None else f" [{iv[0] * 1e3:.0f}-{iv[1] * 1e3:.0f}]"


def markdown(rows: list[dict[str, Any]], names: list[str], command: str) -> str:
    out = [f"# Run-to-run repeatability ({dt.date.today().isoformat()})", "", f"`{command}`", "",
           "Runs: " + "; ".join(f"{i}: {n}" for i, n in enumerate(names)), "",
           "p90s in ms, [the p90's 90 % bootstrap interval over the run's requests]; "
           "diff: each later run against the first run that measured the point.", "",
           "| config | rate | run | attainment | TTFT p90 | TPOT p90 | TTFT diff % | TPOT diff % |",
           "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for r in rows:
        for j, (run, m) in enumerate(zip(r["runs"], r["measured"], strict=True)):
            d = {k: ("" if j == 0 else (lambda v: "-" if v is None else f"{v:+.0f}")(
                r["diff_pct"][k][j - 1])) for k, _ in METRICS}
            out.append(f"| {r['config']} | {r['rate']:g} | {run} | {m.attainment:.0%} | "
                       f"{_ms(m.p90['ttft'])}{fmt_interval(m.interval['ttft'])} | "
                       f"{_ms(m.p90['tpot'])}{fmt_interval(m.interval['tpot'])} | {d['ttft']} | "
                       f"{d['tpot']} |")
    agree = sum(r["within"] for r in rows)
    out += ["", f"Points where every run's TTFT and TPOT p90 is within {LIMIT_PCT:g} % of the "
            f"first run's: {agree} of {len(rows)}."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sweep_repeat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True,
                    help="one measured run: sweep JSON(s), comma-separated (repeat per run)")
    ap.add_argument("--out", type=Path, help="write the table here too (markdown)")
    args = ap.parse_args(argv)
    if len(args.run) < 2:
        ap.error("give at least two --run")
    try:
        loaded = [load_run([Path(p) for p in run.split(",") if p]) for run in args.run]
    except (OSError, ValueError, KeyError) as e:
        print(f"sweep_repeat: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if len({ident for ident, _ in loaded}) != 1:
        print("sweep_repeat: SweepMismatch: the runs measured other workloads or SLOs",
              file=sys.stderr)
        return 2
    command = "python -m bench.sweep_repeat " + " ".join(f"--run {r}" for r in args.run)
    text = markdown(compare([pts for _, pts in loaded]), args.run, command)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
