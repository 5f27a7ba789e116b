"""How results are shown: the progress bar, the end-of-run table, the JSON file, the PNG plots.

matplotlib is optional (`pip install pdserve[bench]`): without it `--plot` says so and the
rest of the run is unaffected. The progress bar is tqdm's when tqdm is installed, else a
plain line on stderr.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.metrics import RequestResult, Stats, Summary

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E"))


class Progress:
    """Counts finished requests: `update(result)` after each, `close()` at the end."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "requests") -> None:
        self.total, self.enabled, self.desc = total, enabled, desc
        self.done = self.failed = 0
        self._last_print = 0.0
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)
            except ImportError:
                self._bar = None

    def update(self, result: RequestResult) -> None:
        self.done += 1
        self.failed += not result.ok
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if self.failed:
                self._bar.set_postfix(errors=self.failed, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_print > 0.5 or self.done == self.total:
            self._last_print = now
            print(f"\r{self.desc}: {self.done}/{self.total} done, {self.failed} failed",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done:
            print(file=sys.stderr)


def machine() -> dict[str, Any]:
    """Where a benchmark ran: the numbers a reader needs to judge it."""
    import os

    info: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(),
                            "python": platform.python_version(), "cpus": os.cpu_count(),
                            "processor": platform.processor() or platform.machine()}
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OMP_", "MKL_", "GOMP_", "KMP_")) or k == "CUDA_VISIBLE_DEVICES"}
    if env:
        info["env"] = env
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["processor"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def _ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1000:.1f}"


def format_summary(s: Summary, title: str = "Serving benchmark") -> str:
    """The end-of-run table (vLLM's layout: one `name: value` per line, latencies in ms)."""
    w = 50
    lines = [f" {title} ".center(w, "="),
             f"{'Requests (ok / sent):':<36}{s.num_ok} / {s.num_requests}",
             f"{'Duration (s):':<36}{s.duration_s:.2f}",
             f"{'Prompt tokens:':<36}{s.prompt_tokens}",
             f"{'Output tokens (server usage):':<36}{s.output_tokens}",
             f"{'Output chunks:':<36}{s.num_chunks}",
             f"{'Request throughput (req/s):':<36}{s.request_throughput:.3f}",
             f"{'Output token throughput (tok/s):':<36}{s.output_token_throughput:.1f}",
             f"{'Total token throughput (tok/s):':<36}{s.total_token_throughput:.1f}",
             (f" SLO: TTFT <= {_ms(s.slo.ttft_s)} ms, "
              f"TPOT <= {_ms(s.slo.tpot_s)} ms ").center(w, "-"),
             f"{'SLO attainment:':<36}{s.attainment:.1%} ({s.num_slo_met}/{s.num_requests})",
             f"{'Goodput (SLO-met req/s):':<36}{s.goodput:.3f}"]
    header = f"{'(ms)':<8}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}"
    lines += ["-" * w, header]
    for key, name in LATENCIES:
        st: Stats | None = getattr(s, key)
        vals = (st.mean, st.median, st.p90, st.p99) if st else (None,) * 4
        lines.append(f"{name:<8}" + "".join(f"{_ms(v):>10}" for v in vals))
    if s.errors:
        lines.append(" Errors ".center(w, "-"))
        lines += [f"  {kind:<34}{n}" for kind, n in sorted(s.errors.items())]
    if s.checks:
        lines.append(" Consistency checks failed ".center(w, "-"))
        lines += [f"  {name:<34}{n}" for name, n in sorted(s.checks.items())]
    lines.append("=" * w)
    return "\n".join(lines)


def write_json(path: str | Path, doc: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=_json_default, allow_nan=False) + "\n")
    return out


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


def clean_floats(obj: Any) -> Any:
    """inf/nan -> strings, so the JSON file stays strict JSON (rates may be inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_floats(v) for v in obj]
    return obj


def pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plots need matplotlib: "
                           "pip install 'pdserve[bench]' (or matplotlib)") from None
    return plt


def plot_cdfs(results: Sequence[RequestResult], path: str | Path, title: str,
              slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> Path:
    """One PNG with the empirical CDFs of TTFT, TPOT, ITL and e2e latency (ms)."""
    plt = pyplot()
    ok = [r for r in results if r.ok]
    series = {"TTFT": [r.ttft_s for r in ok if r.ttft_s is not None],
              "TPOT": [t for r in ok if (t := r.tpot_s) is not None],
              "ITL": [x for r in ok for x in r.itl_s],
              "E2E latency": [r.e2e_s for r in ok if r.e2e_s is not None]}
    slos = {"TTFT": slo_ttft_s, "TPOT": slo_tpot_s}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        xs = sorted(v * 1000 for v in values)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post")
        if slos.get(name):
            ax.axvline(slos[name] * 1000, color="red", linestyle="--", label="SLO")
            ax.legend(loc="lower right")
        ax.set(title=f"{name} (n={len(xs)})", xlabel="ms", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    return save_figure(fig, title, path)


def save_figure(fig: Any, title: str, path: str | Path) -> Path:
    """Title, lay out, write the PNG (creating its folder), close the figure."""
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    pyplot().close(fig)
    return out
