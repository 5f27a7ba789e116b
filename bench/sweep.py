"""One workload at several request rates against several server configurations.

A configuration is either a running server (`name=http://host:port`) or flags for
`pdserve serve` (`name=--prefill 1 --decode 1`), which the sweep starts itself on port 0,
finds the URL in the line `pdserve: serving MODEL on http://HOST:PORT (...)`, waits for
/health, benchmarks and stops with SIGINT (then SIGKILL to its process group if it lingers).

Fairness: at a given rate every configuration gets the same requests and arrival times (seed +
rate index); different rates get different prompts, so a server's prefix cache does not carry
one rate's prompts into the next. Each configuration first serves a few warm-up requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from bench.datasets import BenchRequest
from bench.loadgen import LoadConfig, LoadRun, root_url, run_load
from bench.metrics import Goodput, Slo, Summary, goodput_from_curve, summarize

SERVING_RE = re.compile(r"pdserve: serving (?P<model>\S+) on (?P<url>https?://\S+)")


def serve_cmd(log_level: str | None = None) -> tuple[str, ...]:
    """`pdserve serve` on 127.0.0.1 and a free port, at `pdserve --log-level` if given."""
    return (sys.executable, "-m", "deploy.cli", *(("--log-level", log_level) if log_level else ()),
            "serve", "--host", "127.0.0.1", "--port", "0")


DEFAULT_SERVE_CMD = serve_cmd()


@dataclass(frozen=True)
class ServerSpec:
    """A configuration under test: `url` (already running) or `flags` (started here)."""

    name: str
    url: str | None = None
    flags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, is_url: bool) -> ServerSpec:
        name, sep, rest = text.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected NAME=VALUE, got {text!r}")
        if is_url:
            if not rest.startswith(("http://", "https://")):
                raise ValueError(f"--url {text!r}: the value must start with http:// or https://")
            return cls(name.strip(), url=rest.strip())
        return cls(name.strip(), flags=tuple(shlex.split(rest)))

    def describe(self) -> str:
        return self.url or "pdserve serve " + shlex.join(self.flags)


class LaunchedServer:
    """`pdserve serve` as a subprocess; `url` once started. Use as a context manager."""

    def __init__(self, cmd: Sequence[str], startup_timeout_s: float = 300.0,
                 log_path: Path | None = None) -> None:
        self.cmd, self.startup_timeout_s, self.log_path = list(cmd), startup_timeout_s, log_path
        self.log: list[str] = []
        self.url: str | None = None
        self.model: str | None = None
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> LaunchedServer:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        found = threading.Event()
        threading.Thread(target=self._pump, args=(found,), daemon=True).start()
        try:
            deadline = time.monotonic() + self.startup_timeout_s
            while not found.wait(0.1):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    why = ("exited" if self.proc.poll() is not None
                           else "did not print its URL in time")
                    raise RuntimeError(f"server {why}: {shlex.join(self.cmd)}\n"
                                       + "".join(self.log[-30:]))
            wait_ready(self.url or "", max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def _pump(self, found: threading.Event) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        sink = self.log_path.open("w") if self.log_path else None
        try:
            for line in self.proc.stdout:
                self.log.append(line)
                if sink:
                    sink.write(line)
                    sink.flush()
                m = SERVING_RE.search(line)
                if m and not found.is_set():
                    self.url, self.model = m.group("url"), m.group("model")
                    found.set()
        finally:
            if sink:
                sink.close()

    def stop(self, grace_s: float = 30.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_ready(url: str, timeout_s: float, path: str = "/health") -> None:
    """Poll GET `path` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(root_url(url) + path, timeout=5.0)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.2)
    raise RuntimeError(f"{root_url(url)}{path} not ready after {timeout_s:.0f} s ({last})")


@contextlib.contextmanager
def server_for(spec: ServerSpec, serve_cmd: Sequence[str], common_flags: Sequence[str],
               startup_timeout_s: float, log_path: Path | None) -> Iterator[str]:
    """The URL of `spec`'s server, started (and stopped after) when it has flags."""
    if spec.url:  # any OpenAI-compatible server: /v1/models is the one endpoint all have
        wait_ready(spec.url, min(startup_timeout_s, 30.0), "/v1/models")
        yield spec.url
        return
    with LaunchedServer([*serve_cmd, *common_flags, *spec.flags], startup_timeout_s,
                        log_path) as srv:
        yield srv.url or ""


PLACED_RE = re.compile(r'^pdserve:prefill_placement_total\{placement="(\w+)"\} (\S+)$', re.M)


def placement_counts(url: str) -> dict[str, float]:
    """The server's prefill placements so far (`remote` / `local`); {} where it says none."""
    try:
        text = httpx.get(root_url(url) + "/metrics", timeout=10.0).text
    except httpx.HTTPError:
        return {}
    return {k: float(v) for k, v in PLACED_RE.findall(text)}


@dataclass
class ConfigResult:
    spec: ServerSpec
    points: list[tuple[float, Summary]] = field(default_factory=list)
    error: str | None = None
    placed: list[dict[str, float]] = field(default_factory=list)  # per point: remote / local
    # per point: time.time() of its first arrival and each request's record (no ITLs): what
    # aligns a point with the servers' logs (`bench.serving_trace`)
    records: list[tuple[float, list[dict[str, Any]]]] = field(default_factory=list)

    def goodput(self, target: float) -> Goodput:
        return goodput_from_curve(((r, s.attainment) for r, s in self.points), target)

    def to_dict(self, target: float) -> dict[str, Any]:
        return {"name": self.spec.name, "server": self.spec.describe(), "error": self.error,
                "goodput": asdict(self.goodput(target)),
                "points": [{"request_rate": r, "summary": s.to_dict(),
                            **({"placed": self.placed[i]} if i < len(self.placed) else {}),
                            **({"started_at": self.records[i][0],
                                "requests": self.records[i][1]} if i < len(self.records) else {})}
                           for i, (r, s) in enumerate(self.points)]}


@dataclass(frozen=True)
class SweepPlan:
    """What to run: the rates, the requests per rate (same for every config), the warm-up."""

    rates: tuple[float, ...]
    requests: tuple[tuple[BenchRequest, ...], ...]  # one workload per rate
    warmup: tuple[BenchRequest, ...]
    endpoint: str
    slo: Slo
    stop_below: float = 0.0  # skip higher rates once attainment falls below this

    def __post_init__(self) -> None:
        if len(self.rates) != len(self.requests) or not self.rates:
            raise ValueError("a sweep needs one workload per rate, and at least one rate")


def run_config(spec: ServerSpec, base: LoadConfig, plan: SweepPlan, url: str,
               on_point: Callable[[str, float, LoadRun, Summary], None] | None = None,
               progress: Callable[[int, str], Any] | None = None) -> ConfigResult:
    """Warm up `url`, then run each rate of `plan` against it."""
    out = ConfigResult(spec)
    cfg = replace(base, base_url=url)
    if plan.warmup:
        asyncio.run(run_load(replace(cfg, request_rate=float("inf"), max_concurrency=1),
                             plan.warmup, plan.endpoint))
    for i, (rate, requests) in enumerate(zip(plan.rates, plan.requests, strict=True)):
        bar = progress(len(requests), f"{spec.name} @ {rate:g} req/s") if progress else None
        before = placement_counts(url)
        run = asyncio.run(run_load(replace(cfg, request_rate=rate, seed=base.seed + i), requests,
                                   plan.endpoint, on_result=bar.update if bar else None))
        if bar:
            bar.close()
        summary = summarize(run.results, run.duration_s, plan.slo)
        out.points.append((rate, summary))
        out.records.append((run.started_at, [r.to_dict() for r in run.results]))
        after = placement_counts(url)
        out.placed.append({k: v - before.get(k, 0.0) for k, v in after.items()})
        if on_point:
            on_point(spec.name, rate, run, summary)
        if summary.attainment < plan.stop_below:
            break
    return out


def run_sweep(specs: Sequence[ServerSpec], base: LoadConfig, plan: SweepPlan, *,
              serve_cmd: Sequence[str] = DEFAULT_SERVE_CMD, common_flags: Sequence[str] = (),
              startup_timeout_s: float = 300.0, log_dir: Path | None = None,
              on_point: Callable[[str, float, LoadRun, Summary], None] | None = None,
              progress: Callable[[int, str], Any] | None = None) -> list[ConfigResult]:
    """Every config in turn (one server at a time: they would share the CPU/GPU otherwise).
    A config that fails to start or dies is recorded with its error; the others still run."""
    results = []
    for spec in specs:
        log_path = log_dir / f"server_{spec.name}.log" if log_dir and not spec.url else None
        try:
            with server_for(spec, serve_cmd, common_flags, startup_timeout_s, log_path) as url:
                results.append(run_config(spec, base, plan, url, on_point, progress))
        except (RuntimeError, httpx.HTTPError, ValueError) as e:
            results.append(ConfigResult(spec, error=f"{type(e).__name__}: {e}"))
    return results


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def format_tables(results: Sequence[ConfigResult], slo: Slo) -> str:
    """Markdown: the goodput of each config, then every (config, rate) point."""
    goodput = ["| config | server | goodput (req/s) | first rate missing the SLO |",
               "| --- | --- | ---: | ---: |"]
    for c in results:
        g = c.goodput(slo.attainment)
        value = "error" if c.error else ("< lowest rate" if g.rate is None else f"{g.rate:g}")
        miss = "-" if g.first_miss is None else f"{g.first_miss:g}"
        goodput.append(f"| {c.spec.name} | `{c.spec.describe()}` | {value} | {miss} |")
    points = ["| config | rate (req/s) | SLO attainment | TTFT p50 / p90 (ms) "
              "| TPOT p50 / p90 (ms) | E2E p90 (ms) | done (req/s) | output tok/s | errors "
              "| prefills remote / local |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for c in results:
        if c.error:
            points.append(f"| {c.spec.name} | - | - | - | - | - | - | - | "
                          f"{c.error.splitlines()[0][:80]} | - |")
        for i, (rate, s) in enumerate(c.points):
            placed = c.placed[i] if i < len(c.placed) else {}
            where = (f"{placed.get('remote', 0):.0f} / {placed.get('local', 0):.0f}"
                     if placed else "-")
            ttft = f"{_ms(s.ttft and s.ttft.median)} / {_ms(s.ttft and s.ttft.p90)}"
            tpot = f"{_ms(s.tpot and s.tpot.median)} / {_ms(s.tpot and s.tpot.p90)}"
            errors = ", ".join(f"{k}: {n}" for k, n in sorted(s.errors.items())) or "0"
            points.append(f"| {c.spec.name} | {rate:g} | {s.attainment:.0%} | {ttft} | {tpot} | "
                          f"{_ms(s.e2e and s.e2e.p90)} | {s.request_throughput:.2f} | "
                          f"{s.output_token_throughput:.1f} | {errors} | {where} |")
    slo_line = (f"SLO: TTFT <= {slo.ttft_s * 1000:g} ms and TPOT <= {slo.tpot_s * 1000:g} ms; "
                f"goodput = the highest rate with >= {slo.attainment:.0%} of requests "
                f"meeting both.")
    return "\n".join([slo_line, "", *goodput, "", *points])


def plot_sweep(results: Sequence[ConfigResult], slo: Slo, path: str | Path, title: str) -> Path:
    """One PNG: SLO attainment, p90 TTFT and p90 TPOT against the request rate, per config."""
    from bench.report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for c in results:
        if not c.points:
            continue
        rates = [r for r, _ in c.points]
        axes[0].plot(rates, [s.attainment * 100 for _, s in c.points], marker="o",
                     label=c.spec.name)
        axes[1].plot(rates, [s.ttft.p90 * 1000 if s.ttft else float("nan") for _, s in c.points],
                     marker="o", label=c.spec.name)
        axes[2].plot(rates, [s.tpot.p90 * 1000 if s.tpot else float("nan") for _, s in c.points],
                     marker="o", label=c.spec.name)
    axes[0].axhline(slo.attainment * 100, color="gray", linestyle="--",
                    label=f"{slo.attainment:.0%} target")
    axes[1].axhline(slo.ttft_s * 1000, color="red", linestyle="--", label="SLO")
    axes[2].axhline(slo.tpot_s * 1000, color="red", linestyle="--", label="SLO")
    labels = ("SLO attainment (%)", "TTFT p90 (ms)", "TPOT p90 (ms)")
    for ax, label in zip(axes, labels, strict=True):
        ax.set(xlabel="request rate (req/s)", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylim(0, 105)
    return save_figure(fig, title, path)
