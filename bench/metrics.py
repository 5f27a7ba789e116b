"""What a benchmark measured, and what it means: latency statistics, throughput, SLO, goodput.

Definitions (those of vLLM's benchmark and of DistServe, OSDI '24):
- TTFT: send -> first chunk with text (or with a finish reason, for an empty completion).
- e2e: send -> end of the stream (`data: [DONE]`).
- ITL: the gaps between successive text chunks (a chunk may carry several tokens).
- TPOT: (e2e - TTFT) / (output tokens - 1); undefined for one-token outputs.
- Output tokens: the server's `usage.completion_tokens`, else the number of text chunks.
- A request meets the SLO iff it succeeded, TTFT <= slo_ttft and TPOT <= slo_tpot (an undefined
  TPOT meets it). Attainment: the fraction of *all* requests that meet it (failures miss).
- Goodput of one run: SLO-meeting requests per second of the run. Goodput of a server
  (`goodput_from_curve`): the highest request rate at which attainment >= the target (90%).
Pure functions of `RequestResult`s: no I/O, no clocks.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestResult:
    """One request's outcome; times in seconds, relative to the start of the run."""

    index: int
    scheduled_s: float = 0.0
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    num_chunks: int = 0
    prompt_tokens: int | None = None  # server's usage
    completion_tokens: int | None = None  # server's usage
    expected_prompt_tokens: int = 0  # as the dataset counted it
    expected_output_tokens: int = 0  # max_tokens when the server must reach it (ignore_eos), else 0
    finish_reason: str | None = None
    # a short kind: http_503, timeout, connect_error, stream_error:<code>...
    error: str | None = None
    error_detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.num_chunks

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self, with_itl: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        if not with_itl:
            del d["itl_s"]
        return d


@dataclass(frozen=True)
class Slo:
    """Latency targets in seconds, and the attainment a server must reach at a rate."""

    ttft_s: float
    tpot_s: float
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0 and 0 < self.attainment <= 1):
            raise ValueError(f"SLO needs ttft > 0, tpot > 0 and 0 < attainment <= 1, got {self}")

    def met(self, r: RequestResult) -> bool:
        if not r.ok or r.ttft_s is None or r.ttft_s > self.ttft_s:
            return False
        tpot = r.tpot_s
        return tpot is None or tpot <= self.tpot_s


@dataclass(frozen=True)
class Stats:
    """mean, median, p90, p99, min, max over n values (numpy's linear-interpolated percentiles)."""

    n: int
    mean: float
    median: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats | None:
        x = np.asarray(list(values), dtype=np.float64)
        if x.size == 0:
            return None
        p50, p90, p99 = np.percentile(x, [50, 90, 99])
        return cls(int(x.size), float(x.mean()), float(p50), float(p90), float(p99),
                   float(x.min()), float(x.max()))


def check_request(r: RequestResult) -> list[str]:
    """Inconsistencies in one successful request (names of the checks it fails)."""
    if not r.ok:
        return []
    problems = []
    if r.ttft_s is None or r.e2e_s is None or r.ttft_s > r.e2e_s or r.ttft_s < 0:
        problems.append("ttft_not_within_e2e")
    if r.completion_tokens is None:
        problems.append("no_usage")
    elif r.num_chunks > r.completion_tokens:  # every text chunk holds >= 1 token
        problems.append("more_chunks_than_tokens")
    if r.expected_output_tokens and r.completion_tokens is not None \
            and r.completion_tokens != r.expected_output_tokens:
        problems.append("output_len_not_max_tokens")
    if r.ttft_s is not None and r.e2e_s is not None \
            and not math.isclose(r.ttft_s + sum(r.itl_s), r.e2e_s, rel_tol=0.5, abs_tol=0.05):
        problems.append("itl_sum_not_e2e")
    return problems


@dataclass(frozen=True)
class Summary:
    """Everything a run reports. Throughputs are per second of `duration_s`."""

    num_requests: int
    num_ok: int
    duration_s: float
    errors: dict[str, int]
    checks: dict[str, int]  # check name -> number of requests failing it (see check_request)
    prompt_tokens: int
    output_tokens: int
    num_chunks: int
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    ttft: Stats | None
    tpot: Stats | None
    itl: Stats | None
    e2e: Stats | None
    slo: Slo
    num_slo_met: int
    attainment: float
    goodput: float  # SLO-meeting requests per second

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: Sequence[RequestResult], duration_s: float, slo: Slo) -> Summary:
    ok = [r for r in results if r.ok]
    duration = max(duration_s, 1e-9)
    prompt = sum(r.prompt_tokens if r.prompt_tokens is not None else r.expected_prompt_tokens
                 for r in ok)
    output = sum(r.output_tokens for r in ok)
    met = sum(slo.met(r) for r in results)
    checks = Counter(name for r in ok for name in check_request(r))
    return Summary(
        num_requests=len(results), num_ok=len(ok), duration_s=duration_s,
        errors=dict(Counter(r.error for r in results if r.error is not None)),
        checks=dict(checks), prompt_tokens=prompt, output_tokens=output,
        num_chunks=sum(r.num_chunks for r in ok),
        request_throughput=len(ok) / duration, output_token_throughput=output / duration,
        total_token_throughput=(prompt + output) / duration,
        ttft=Stats.of(r.ttft_s for r in ok if r.ttft_s is not None),
        tpot=Stats.of(t for r in ok if (t := r.tpot_s) is not None),
        itl=Stats.of(x for r in ok for x in r.itl_s),
        e2e=Stats.of(r.e2e_s for r in ok if r.e2e_s is not None),
        slo=slo, num_slo_met=met, attainment=met / len(results) if results else 0.0,
        goodput=met / duration)


@dataclass(frozen=True)
class Goodput:
    """A server's goodput read off its attainment curve: `rate` is the highest measured rate
    such that it and every lower measured rate reach the target (None: even the lowest misses);
    `first_miss` is the lowest rate that misses (None: none does, so goodput may be higher)."""

    rate: float | None
    first_miss: float | None


def goodput_from_curve(points: Iterable[tuple[float, float]], target: float = 0.9) -> Goodput:
    """DistServe's goodput from (request rate, attainment) points. A pass above a miss (noise)
    does not count: the goodput is where the curve first drops below the target."""
    best = None
    for rate, attainment in sorted(points):
        if attainment < target:
            return Goodput(best, rate)
        best = rate
    return Goodput(best, None)
