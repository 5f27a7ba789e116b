"""`bench.serving_trace` reads what the engine and the placer log at DEBUG. The lines here are
written by the real engine and the real placer through the workers' and the proxy's log formats,
so a change to either line that the trace no longer parses fails here."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.serving_trace import noise_sigma, parse_log, point_report, step_model_errors
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from planner.profile import StepTimes
from proxy.placement import Placement, Slo
from proxy.placer import Placer
from tests.unit.planner_fixtures import small_profile, worker_hello

WORKER_FMT = "%(asctime)s %(levelname)s [decode 0] %(name)s: %(message)s"  # worker/main.py
PROXY_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # deploy/cli.py


def _lines(caplog: pytest.LogCaptureFixture, fmt: str) -> list[str]:
    f = logging.Formatter(fmt)
    return [f.format(r) for r in caplog.records]



def test_engine_steps_and_placements_are_parsed(
        tiny_hf_checkpoint: Callable[[str], Path], caplog: pytest.LogCaptureFixture) -> None:
    cfg = EngineConfig(model=str(tiny_hf_checkpoint("llama_gqa")), kv_cache_memory="4MiB",
                       max_model_len=128, block_size=8, max_num_batched_tokens=16)
    engine = LLMEngine.from_config(cfg, log_plan=False)
    caplog.set_level(logging.DEBUG, logger="engine.llm_engine")
    t0 = time.time()
    engine.generate([list(range(1, 41))], SamplingParams(max_tokens=3, temperature=0.0,
                                                         ignore_eos=True))
    steps, placed = parse_log(_lines(caplog, WORKER_FMT))
    assert placed == []
    assert [(s.prefill_tokens, s.token_context, s.decode_seqs, s.decode_context)
            for s in steps] == [(16, 0, 0, 0), (16, 16 * 16, 0, 0), (8, 8 * 32, 0, 0),
                                (0, 0, 1, 41), (0, 0, 1, 42)]
    assert [s.kind for s in steps] == ["prefill"] * 3 + ["decode"] * 2
    assert all(s.who == "decode 0" and t0 - 1 <= s.at <= time.time() + 1 for s in steps)
    assert [round(s.seconds, 4) for s in steps] == [round(s.seconds, 4)
                                                    for s in engine.step_log][-5:]
    ratios = step_model_errors(steps, StepTimes(small_profile()))
    assert sorted(ratios) == ["decode", "prefill"] and len(ratios["prefill"]) == 3

    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="proxy.placer")
    placer = Placer(Placement.ADAPTIVE, Slo(3.0, 0.15))
    placer.on_hello(worker_hello("d0", "decode"))
    prediction = placer.place("r1", list(range(300)), 8, "d0", [], Placement.LOCAL)
    _, placed = parse_log(_lines(caplog, PROXY_FMT))
    assert len(placed) == 1
    p = placed[0]
    assert (p.request_id, p.tokens, p.where, p.chunk, p.running) == (
        "r1", 300, "local", prediction.chunk, 0)
    assert p.ttft_s == pytest.approx(prediction.ttft_s, rel=1e-6)


def test_a_slow_request_is_shown_with_the_steps_before_its_first_token() -> None:
    """Two requests: one met the SLO, one waited 0.9 s behind a 0.8 s prefill step."""
    stamp = "2026-12-06 12:00:0{},{:03d}"
    lines = [
        f"{stamp.format(1, 200)} DEBUG pdserve.proxy: placed abc (500 tokens): Prediction("
        "placement=<Placement.LOCAL: 'local'>, ttft_s=0.2, tpot_s=0.01, margin=1.0, "
        "ttft_margin=1.0, prefill_id=None, chunk=0, prefill_s=0.2); other Prediction(x); decode "
        "DecodeView(worker_id='d0', model=Coefficients(a=1), num_running=1, context_tokens=9, "
        "local_queue_s=0.5, local_chunk=0); prefill []",
        f"{stamp.format(2, 0)} DEBUG [decode 0] engine.llm_engine: step 800.0 ms: 7000 prefill "
        "tokens in 1 prompts (token context 0), 1 decoding over 90 context tokens",
        f"{stamp.format(2, 100)} DEBUG [decode 0] engine.llm_engine: step 100.0 ms: 500 prefill "
        "tokens in 1 prompts (token context 0), 1 decoding over 91 context tokens",
    ]
    steps, placed = parse_log(lines)
    start = steps[0].at - 1.0  # the point began 1 s before the first step ended
    point = {"started_at": start, "requests": [
        {"scheduled_s": 0.0, "ttft_s": 0.1, "e2e_s": 0.5, "tpot_s": 0.01, "prompt_tokens": 7000},
        {"scheduled_s": 0.2, "ttft_s": 0.95, "e2e_s": 1.5, "tpot_s": 0.02,
         "prompt_tokens": 500}]}
    text = "\n".join(point_report(point, steps, placed, {"ttft_s": 0.5, "tpot_s": 0.05}, None))
    assert "1 of 2 requests missed the SLO" in text
    row = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert row == ["| 1 | 0.20 | 500 | 950 | 20.0 | local | none | 1 | 500 | 200 | 2 | 0.900 | "
                   "800 | 7500 |"]


def test_noise_sigma_recovers_a_log_normal_spread() -> None:
    """The `--step-noise` the trace reports: a log-normal's sigma, whatever its median."""
    import math
    import random
    rng = random.Random(0)
    for sigma, median in ((0.1, 1.0), (0.3, 1.4)):
        ratios = [median * math.exp(rng.gauss(0.0, sigma)) for _ in range(5000)]
        assert noise_sigma(ratios) == pytest.approx(sigma, rel=0.1)
    assert math.isnan(noise_sigma([1.0] * 5))  # too few steps to say


def test_a_gzipped_log_reads_as_the_plain_one(tmp_path: Path) -> None:
    """Results keep server logs gzipped (server_<config>.log.gz); the report is the same."""
    import gzip

    from bench.serving_trace import report
    lines = ["2026-12-06 19:54:19,149 DEBUG [decode decode-0] engine.llm_engine: step 119.3 ms: "
             "16 prefill tokens in 1 prompts (token context 0), 0 decoding over 0 context tokens",
             "2026-12-06 19:54:19,231 DEBUG [decode decode-0] engine.llm_engine: step 81.7 ms: "
             "0 prefill tokens in 0 prompts (token context 0), 1 decoding over 17 context tokens"]
    sweep = {"slo": {"ttft_s": 1.0, "tpot_s": 0.05}, "configs": [{"name": "c", "points": []}]}
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    (plain / "server_c.log").write_text("\n".join(lines) + "\n")
    with gzip.open(packed / "server_c.log.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    text = report(sweep, plain, None)
    assert "## c: 2 step lines" in text
    assert report(sweep, packed, None) == text.replace(str(plain), str(packed))
    assert "no log at" in report(sweep, tmp_path, None)


def test_a_point_holds_only_the_steps_of_its_requests() -> None:
    """Warm-up steps before the first point, and steps after a point's last request, are not
    the point's (nor in the pooled step noise)."""
    from bench.serving_trace import Step, point_steps
    point = {"started_at": 100.0, "requests": [{"scheduled_s": 0.0, "e2e_s": 2.0},
                                               {"scheduled_s": 3.0, "e2e_s": 1.0}]}
    steps = [Step(at, "decode 0", 0.05, 0, 0, 1, 10) for at in (50.0, 100.5, 103.9, 104.4, 110.0)]
    assert [s.at for s in point_steps(point, steps) or []] == [100.5, 103.9, 104.4]
    assert point_steps({"started_at": None, "requests": []}, steps) is None
