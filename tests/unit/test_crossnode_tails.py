"""`bench.crossnode`'s per-request overlap: each request's own prefill, read from the prefill
worker's step lines, against its TTFT (issue 17's target, immune to the prefill's drift)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from bench.crossnode import overlap_lines, request_tails, tail_lines


def _line(at: float, who: str, ms: float, prefill: int) -> str:
    stamp = dt.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    return (f"{stamp} DEBUG [{who}] engine.llm_engine: step {ms:.1f} ms: {prefill} prefill "
            f"tokens in 1 prompts (token context 0), 0 decoding over 0 context tokens")


def _run(tmp_path: Path, name: str, start: float, ttfts: list[float],
         prefill_s: float) -> tuple[Path, str]:
    """Requests 10 s apart, each prefilled in two steps ending `prefill_s` after its arrival
    (plus one decode-worker step that must be ignored)."""
    reqs, lines = [], []
    for i, ttft in enumerate(ttfts):
        arrival = start + 10.0 * i
        reqs.append({"start_s": 10.0 * i, "ttft_s": ttft})
        lines += [_line(arrival + prefill_s / 2, "prefill 0", prefill_s / 2 * 1e3, 512),
                  _line(arrival + prefill_s, "prefill 0", prefill_s / 2 * 1e3, 512),
                  _line(arrival + ttft - 0.001, "decode 0", 5.0, 1024)]
    result = tmp_path / f"{name}.json"
    result.write_text(json.dumps({"started_at": start, "requests": reqs}))
    return result, "\n".join(lines)


def test_tails_and_the_per_request_target(tmp_path: Path) -> None:
    start = 1.8e9
    # whole: 2 s of prefill, then 0.5 s of transfer and 0.05 s of hops
    whole = request_tails(*_run(tmp_path, "whole", start, [2.55, 2.56, 2.55], 2.0))
    assert [round(x, 2) for x in whole["tail"]] == [0.55, 0.56, 0.55]
    assert [round(x, 2) for x in whole["own_prefill"]] == [2.0, 2.0, 2.0]
    # layer-wise: a slower prefill (2.2 s) but only 0.06 s after it: 0.01 s of transfer exposed
    # (allowed: 10 % of 0.5 s); one request left 0.2 s exposed and misses
    lw = request_tails(*_run(tmp_path, "lw", start + 100, [2.26, 2.26, 2.45], 2.2))
    rows = [{"link": "10gbit", "input_len": 4096, "serve_args": "--kv-streaming whole",
             "kv_seconds_per_remote_request": 0.5, "tails": whole},
            {"link": "10gbit", "input_len": 4096, "serve_args": "--kv-streaming layerwise",
             "kv_seconds_per_remote_request": 0.5, "tails": lw}]
    table = tail_lines(rows)
    assert table[-1] == ("| 10gbit | --kv-streaming layerwise | 4096 | 2200 / 2000 | 500 | 50 | "
                         "10 | 50 | 2 of 3 |")


def test_no_step_lines_no_tails(tmp_path: Path) -> None:
    result, _ = _run(tmp_path, "x", 1.8e9, [1.0], 0.5)
    assert request_tails(result, "no steps here") == {}
    assert tail_lines([{"link": "l", "input_len": 1, "serve_args": "", "tails": {}}]) == []


def test_the_p50_overlap_table_pairs_each_layerwise_row_with_its_whole_twin() -> None:
    """prefill-only = whole TTFT - KV seconds = 2050 ms, transfer-only 500 ms: target 2100 ms."""
    rows = [{"link": "10gbit", "input_len": 4096, "serve_args": "--kv-streaming whole --x 1",
             "ttft_p50_ms": 2550.0, "kv_seconds_per_remote_request": 0.5},
            {"link": "10gbit", "input_len": 4096, "serve_args": "--kv-streaming layerwise --x 1",
             "ttft_p50_ms": 2090.0, "kv_seconds_per_remote_request": 0.5},
            {"link": "10gbit", "input_len": 4096,
             "serve_args": "--kv-streaming layerwise --kv-stream-groups 16 --x 1",
             "ttft_p50_ms": 2300.0, "kv_seconds_per_remote_request": 0.5},
            {"link": "1gbit", "input_len": 4096, "serve_args": "--kv-streaming layerwise --x 1",
             "ttft_p50_ms": 1.0, "kv_seconds_per_remote_request": 0.5}]  # no twin: no row
    table = overlap_lines(rows)
    assert table[-2:] == [
        "| 10gbit | --kv-streaming layerwise --x 1 | 4096 | 2050 | 500 | 2100 | 2090 | 92% | yes |",
        "| 10gbit | --kv-streaming layerwise --kv-stream-groups 16 --x 1 | 4096 | 2050 | 500 | "
        "2100 | 2300 | 50% | no |"]
    assert overlap_lines(rows[:1]) == []

