"""The benchmark harness against a live `pdserve serve` (1 prefill + 1 decode, SmolLM2):
small request counts; the numbers must be consistent (TTFT <= e2e, the server's usage equals
what was asked and what the harness counted) and no request may fail."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from serving import DISAGG, Server

from bench.datasets import DatasetConfig, build_dataset, load_tokenizer
from bench.loadgen import LoadConfig, run_load
from bench.metrics import Slo, check_request, summarize
from deploy.bench_cli import add_bench_parser

pytestmark = pytest.mark.timeout(180)
LOOSE_SLO = Slo(ttft_s=60.0, tpot_s=10.0)  # consistency is under test here, not speed


@pytest.fixture(scope="module")
def server(shared_deployment: Callable[..., Server]) -> Server:
    """1 prefill + 1 decode, remote placement, shared with other modules (tests/conftest.py)."""
    return shared_deployment(*DISAGG)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def test_synthetic_completions_are_consistent(server: Server, tokenizer) -> None:
    reqs = build_dataset(DatasetConfig(num_prompts=6, input_len="uniform:16:48", output_len="8"),
                         tokenizer, 0)
    run = asyncio.run(run_load(LoadConfig(base_url=server.url, request_rate=4.0, seed=0), reqs,
                               "completions"))
    assert run.model == "smollm2"
    for req, r in zip(reqs, run.results, strict=True):
        assert r.ok, (r.error, r.error_detail)
        assert 0 < r.ttft_s <= r.e2e_s
        assert r.completion_tokens == 8  # ignore_eos: exactly max_tokens
        assert 1 <= r.num_chunks <= r.completion_tokens
        assert r.prompt_tokens == req.num_prompt_tokens  # same tokenizer, same text
        assert check_request(r) == []
    s = summarize(run.results, run.duration_s, LOOSE_SLO)
    assert s.errors == {} and s.checks == {} and s.attainment == 1.0
    assert s.output_tokens == 48 and s.tpot is not None and s.tpot.n == 6


def test_multiturn_chat_with_bounded_concurrency(server: Server, tokenizer) -> None:
    cfg = DatasetConfig(dataset="multiturn", num_prompts=6, num_turns=3, input_len="12",
                        output_len="6", system_prompt_len=32)
    reqs = build_dataset(cfg, tokenizer, 1)
    run = asyncio.run(run_load(LoadConfig(base_url=server.url, max_concurrency=2, seed=1), reqs,
                               "chat"))
    for r in run.results:
        assert r.ok, (r.error, r.error_detail)
        assert r.ttft_s <= r.e2e_s and r.completion_tokens == 6 and r.num_chunks <= 6
    by_turn = {(req.conversation, req.turn): r.prompt_tokens
               for req, r in zip(reqs, run.results, strict=True)}
    for conv in (0, 1):  # the chat template adds tokens, but each turn resends the previous one
        assert by_turn[conv, 0] < by_turn[conv, 1] < by_turn[conv, 2]
    assert server.wait_idle_blocks() == 0  # the harness's requests left no KV block behind


def test_bench_command_writes_consistent_results(server: Server, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="pdserve")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    result = tmp_path / "live.json"
    args = parser.parse_args(["bench", "--base-url", server.url, "--num-prompts", "4",
                              "--input-len", "24", "--output-len", "6", "--request-rate", "8",
                              "--no-progress", "--result-file", str(result), "--slo-ttft", "60",
                              "--slo-tpot", "10"])
    assert args.func(args) == 0
    assert "SLO attainment:" in capsys.readouterr().out
    doc = json.loads(result.read_text())
    assert doc["tokenizer"] == "smollm2" and doc["summary"]["errors"] == {}
    assert doc["summary"]["output_tokens"] == 24 and doc["summary"]["prompt_tokens"] == 4 * 24
    for r in doc["requests"]:
        assert r["error"] is None and r["ttft_s"] <= r["e2e_s"] and r["completion_tokens"] == 6
