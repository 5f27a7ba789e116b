"""Serving steps by what the other workers ran at the same time (`bench.serving_trace` uses it).

Workers pinned to cores of one CPU share its caches and memory bandwidth, while a profile times
each step alone. Each step of a log is classed by how much of it overlapped another worker's
steps: "alone" (under 20 % of it), "beside prefill" (80 % or more of it beside steps that carry
prefill tokens), "beside decode" (80 % or more beside steps at all, less of it beside prefill),
and left out otherwise; `overlap_table` gives measured / modelled step time per kind and class.
On this 2-core VM (2026-12-07, the first bracketed run's prefill-heavy 1p1d logs) decode steps
beside a prefill on the other core ran 1.29x the model at p50, alone 1.09x.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from planner.profile import StepTimes

if TYPE_CHECKING:  # serving_trace imports this module at run time
    from bench.serving_trace import Step

ALONE, BESIDE_DECODE, BESIDE_PREFILL = "alone", "beside decode", "beside prefill"
CLASSES = (ALONE, BESIDE_DECODE, BESIDE_PREFILL)


def pct(xs: Sequence[float], q: float) -> float:
    """The nearest-rank `q` quantile of `xs` (the serving trace's p90s)."""
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]


def _covered(intervals: list[tuple[float, float]], ends: list[float], a: float, b: float) -> float:
    """Seconds of [a, b] covered by `intervals` (sorted, non-overlapping; `ends` their ends)."""
    total = 0.0
    for i in range(bisect.bisect_right(ends, a), len(intervals)):  # no copy of the tail
        start, end = intervals[i]
        if start >= b:
            break
        total += min(b, end) - max(a, start)
    return total


def classify(steps: Sequence[Step]) -> list[str | None]:
    """Each step's class (None: partly overlapped), by the other workers' steps."""
    def spans(who: str, prefill_only: bool) -> tuple[list[tuple[float, float]], list[float]]:
        iv = sorted((s.at - s.seconds, s.at) for s in steps
                    if s.who == who and (s.prefill_tokens > 0 or not prefill_only))
        return iv, [e for _, e in iv]

    workers = sorted({s.who for s in steps})
    every = {w: spans(w, False) for w in workers}
    heavy = {w: spans(w, True) for w in workers}
    out: list[str | None] = []
    for s in steps:
        a, b = s.at - s.seconds, s.at
        if b <= a:
            out.append(None)
            continue
        others = [w for w in workers if w != s.who]
        busy = max((_covered(*every[w], a, b) for w in others), default=0.0) / (b - a)
        beside_prefill = max((_covered(*heavy[w], a, b) for w in others),
                             default=0.0) / (b - a)
        out.append(BESIDE_PREFILL if beside_prefill >= 0.8 else BESIDE_DECODE if busy >= 0.8
                   else ALONE if busy < 0.2 else None)
    return out


def overlap_ratios(steps: Sequence[Step], times: StepTimes) -> dict[tuple[str, str],
                                                                          list[float]]:
    """Measured / modelled step time by (kind of step, class)."""
    out: dict[tuple[str, str], list[float]] = {}
    for s, c in zip(steps, classify(steps), strict=True):
        model = times.step_s(s.prefill_tokens, s.token_context, s.decode_seqs, s.decode_context)
        if c is not None and model > 0:
            out.setdefault((s.kind, c), []).append(s.seconds / model)
    return out


def overlap_table(steps: Sequence[Step], times: StepTimes) -> list[str]:
    """Markdown rows: per kind of step, n and measured / modelled p50 (p90) in each class."""
    ratios = overlap_ratios(steps, times)
    kinds = sorted({k for k, _ in ratios})
    lines = ["| steps | " + " | ".join(CLASSES) + " |", "| --- |" + " ---: |" * len(CLASSES)]
    for kind in kinds:
        cells = []
        for c in CLASSES:
            r = ratios.get((kind, c), [])
            cells.append("-" if not r else f"{statistics.median(r):.2f} "
                         f"({pct(r, 0.9):.2f}), n={len(r)}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines
