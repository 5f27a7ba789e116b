"""What a sweep's servers did, read from their DEBUG logs beside the sweep's JSON.

    pdserve bench sweep ... --server-log-level debug --log-dir LOGS --output SWEEP
    python -m bench.serving_trace --sweep SWEEP.json --log-dir LOGS [--profile P.json] [--out F.md]

For every point (configuration x rate) it aligns the engine's step lines and the proxy's
placement lines with the point's requests (the JSON keeps each point's start time and its
requests' records), and writes:
- how busy the engines were, and, given a profile, each step's measured time against the
  planner's step model (`planner.profile.StepTimes`) by kind of step (decode only, prefill only,
  mixed): whether a prediction error is the step model's or the serving around it;
- every request that missed the SLO: its placement (local/remote, chunk cap, predicted TTFT, the
  batch it joined) and the steps between its arrival and its first token (count, their summed
  and longest time, the prefill tokens they carried), so a slow first token is either queueing
  behind named work or time outside the engine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.step_overlap import overlap_table, pct
from planner.profile import Profile, StepTimes

STAMP = r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ (?:\[(?P<who>[^\]]+)\] )?"
STEP_RE = re.compile(STAMP + r".*?step (?P<ms>[\d.]+) ms: (?P<p>\d+) prefill tokens in \d+ "
                     r"prompts \(token context (?P<tc>\d+)\), (?P<d>\d+) decoding over "
                     r"(?P<dc>\d+) context tokens")
PLACED_RE = re.compile(STAMP + r".*?placed (?P<rid>\S+) \((?P<tokens>\d+) tokens\): "
                       r"Prediction\(placement=<Placement\.\w+: '(?P<where>\w+)'>, "
                       r"ttft_s=(?P<ttft>[-\d.e]+).*?chunk=(?P<chunk>\d+).*?\); other .*?"
                       r"DecodeView\(worker_id='[^']*', model=.*?, num_running=(?P<running>\d+), "
                       r"context_tokens=\d+, local_queue_s=(?P<queue>[-\d.e]+)")


@dataclass(frozen=True)
class Step:
    at: float  # time.time() when the step's line was written (its end)
    who: str  # the process's tag, e.g. "decode 0"
    seconds: float
    prefill_tokens: int
    token_context: int
    decode_seqs: int
    decode_context: int

    @property
    def kind(self) -> str:
        if self.prefill_tokens and self.decode_seqs:
            return "mixed"
        return "prefill" if self.prefill_tokens else "decode"


@dataclass(frozen=True)
class Placed:
    at: float
    request_id: str
    tokens: int
    where: str
    ttft_s: float
    chunk: int
    running: int
    queue_s: float


def _stamp(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logged


def parse_log(lines: Iterable[str]) -> tuple[list[Step], list[Placed]]:
    """The engine step lines and the proxy placement lines of a server log, in order."""
    steps, placed = [], []
    for line in lines:
        if (m := STEP_RE.search(line)) is not None:
            steps.append(Step(_stamp(m["at"]), m["who"] or "", float(m["ms"]) / 1e3, int(m["p"]),
                              int(m["tc"]), int(m["d"]), int(m["dc"])))
        elif (m := PLACED_RE.search(line)) is not None:
            placed.append(Placed(_stamp(m["at"]), m["rid"], int(m["tokens"]), m["where"],
                                 float(m["ttft"]), int(m["chunk"]), int(m["running"]),
                                 float(m["queue"])))
    return steps, placed


def step_model_errors(steps: Sequence[Step], times: StepTimes) -> dict[str, list[float]]:
    """Measured / predicted seconds of each step, by kind."""
    out: dict[str, list[float]] = {}
    for s in steps:
        predicted = times.step_s(s.prefill_tokens, s.token_context, s.decode_seqs,
                                 s.decode_context)
        if predicted > 0:
            out.setdefault(s.kind, []).append(s.seconds / predicted)
    return out


def noise_sigma(ratios: Sequence[float]) -> float:
    """The log-normal sigma of steps around their model, robustly: (ln p90 - ln p50) / z(0.9)
    (the simulator's `--step-noise`: a factor of median 1 on the modelled step)."""
    if len(ratios) < 10:
        return math.nan
    return max(0.0, math.log(pct(ratios, 0.9) / statistics.median(ratios)) / 1.2816)


def _met(r: dict[str, Any], slo: dict[str, float]) -> bool:
    if r.get("error") or r.get("ttft_s") is None or r["ttft_s"] > slo["ttft_s"]:
        return False
    tpot = r.get("tpot_s")
    return tpot is None or tpot <= slo["tpot_s"]


def _match(r: dict[str, Any], arrival: float, placed: list[Placed]) -> Placed | None:
    """The placement line of a request: the first one at or after its arrival with its prompt
    length (placement lines carry the proxy's request id, which the client never sees)."""
    tokens = r.get("prompt_tokens") or r.get("expected_prompt_tokens")
    for p in placed:
        if p.at >= arrival - 0.005 and p.tokens == tokens:
            return p
    return None


def point_span(point: dict[str, Any]) -> tuple[float, float] | None:
    """(start, end) in epoch seconds of a sweep point: its start to its last request's end;
    None for a sweep without request records (older than `started_at`)."""
    start, reqs = point.get("started_at"), point.get("requests")
    if start is None or not reqs:
        return None
    return start, start + max(r["scheduled_s"] + (r.get("e2e_s") or 0.0) for r in reqs)


def point_steps(point: dict[str, Any], steps: list[Step]) -> list[Step] | None:
    """The steps that ran while the point's requests were in flight (not the server's warm-up
    nor another point's); None for a sweep without request records."""
    if (span := point_span(point)) is None:
        return None
    return [s for s in steps if span[0] <= s.at <= span[1] + 0.5]


def point_report(point: dict[str, Any], steps: list[Step], placed: list[Placed],
                 slo: dict[str, float], times: StepTimes | None) -> list[str]:
    inside, span = point_steps(point, steps), point_span(point)
    if inside is None or span is None:
        return ["(no request records in this point: a sweep from before `started_at`)"]
    (start, end), reqs = span, point["requests"]
    busy = sum(s.seconds for s in inside)
    lines = [f"{len(inside)} steps in {end - start:.1f} s, engines busy {busy:.1f} s "
             f"({busy / max(end - start, 1e-9):.0%} of the span, summed over workers)"]
    if times is not None and inside:
        lines += ["", "| steps | n | measured / model p50 | p90 | max | noise sigma | "
                  "measured s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for kind, ratios in sorted(step_model_errors(inside, times).items()):
            secs = sum(s.seconds for s in inside if s.kind == kind)
            lines.append(f"| {kind} | {len(ratios)} | {statistics.median(ratios):.2f} | "
                         f"{pct(ratios, 0.9):.2f} | {max(ratios):.2f} | "
                         f"{noise_sigma(ratios):.2f} | {secs:.2f} |")
    slow = [(i, r) for i, r in enumerate(reqs) if not _met(r, slo)]
    lines += ["", f"{len(slow)} of {len(reqs)} requests missed the SLO"]
    if not slow:
        return lines
    lines += ["", "| # | arrival s | prompt | TTFT ms | TPOT ms | placed | chunk | running | "
              "queue ms | predicted TTFT ms | steps to 1st token | their s | longest ms | "
              "prefill tokens in them |", "| " + " | ".join(["---"] * 14) + " |"]
    for i, r in slow:
        arrival = start + r["scheduled_s"]
        first = arrival + (r.get("ttft_s") or 0.0)
        window = [s for s in inside if arrival <= s.at <= first]
        p = _match(r, arrival, placed)
        where = ("-", "-", "-", "-", "-") if p is None else (
            p.where, str(p.chunk or "none"), str(p.running), f"{p.queue_s * 1e3:.0f}",
            f"{p.ttft_s * 1e3:.0f}")
        tpot = "-" if r.get("tpot_s") is None else f"{r['tpot_s'] * 1e3:.1f}"
        lines.append(
            f"| {i} | {r['scheduled_s']:.2f} | {r.get('prompt_tokens') or '-'} | "
            f"{(r.get('ttft_s') or 0) * 1e3:.0f} | {tpot} | "
            f"{' | '.join(where)} | {len(window)} | {sum(s.seconds for s in window):.3f} | "
            f"{max((s.seconds for s in window), default=0) * 1e3:.0f} | "
            f"{sum(s.prefill_tokens for s in window)} |")
    return lines


def report(sweep: dict[str, Any], log_dir: Path, times: StepTimes | None) -> str:
    slo = sweep["slo"]
    out = [f"# Serving trace of {sweep.get('command', 'a sweep')}", "",
           f"SLO TTFT {slo['ttft_s'] * 1e3:g} ms, TPOT {slo['tpot_s'] * 1e3:g} ms; logs {log_dir}"]
    pooled: dict[str, list[float]] = {}
    for config in sweep["configs"]:
        log = log_dir / f"server_{config['name']}.log"
        packed = log.with_name(log.name + ".gz")  # as results keep them
        if not log.is_file() and not packed.is_file():
            out += ["", f"## {config['name']}: no log at {log} (or {packed.name})"]
            continue
        with (log.open(errors="replace") if log.is_file()
              else gzip.open(packed, "rt", errors="replace")) as f:
            steps, placed = parse_log(f)
        out += ["", f"## {config['name']}: {len(steps)} step lines, {len(placed)} placement lines"]
        if not steps:
            out.append("(no step lines: was the server started with --server-log-level debug?)")
        served: list[Step] = []  # the points' steps: no warm-up, no gap between points
        for point in config["points"]:
            out += ["", f"### {point['request_rate']:g} req/s", ""]
            out += point_report(point, steps, placed, slo, times)
            served += point_steps(point, steps) or []
        if times is not None:
            for kind, ratios in step_model_errors(served, times).items():
                pooled.setdefault(kind, []).extend(ratios)
            if len({s.who for s in served}) > 1:
                out += ["", "### Steps by what the other workers ran (every point)", "",
                        "Measured / modelled p50 (p90) of steps alone (under 20 % of the step "
                        "beside another worker's steps), beside another's decode-only steps and "
                        "beside its prefill steps (80 % or more; `bench/step_overlap.py`): the "
                        "profile times each step alone.", ""]
                out += overlap_table(served, times)
    if pooled:
        every = [r for ratios in pooled.values() for r in ratios]
        out += ["", "## Step noise over every configuration and rate", "",
                "Log-normal sigma of measured / modelled step times over the points' steps "
                "(warm-up excluded; (ln p90 - ln p50) / 1.28; "
                "the planner's `--step-noise`): " + ", ".join(
                    f"{kind} {noise_sigma(r):.2f} (n={len(r)})" for kind, r in sorted(
                        pooled.items())) + f"; all steps {noise_sigma(every):.2f}."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serving_trace", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", required=True, help="A `pdserve bench sweep` JSON.")
    ap.add_argument("--log-dir", required=True, help="Its `--log-dir` (server_<config>.log).")
    ap.add_argument("--profile", default=None,
                    help="A `pdserve profile` JSON: compare each step with the step model.")
    ap.add_argument("--step-overhead", type=float, default=0.0,
                    help="Seconds added to each modelled step (as `pdserve plan cluster`).")
    ap.add_argument("--out", default=None, help="Write the Markdown here too.")
    args = ap.parse_args(argv)
    sweep = json.loads(Path(args.sweep).read_text())
    times = (StepTimes(Profile.load(args.profile), args.step_overhead) if args.profile
             else None)
    text = report(sweep, Path(args.log_dir), times)
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
