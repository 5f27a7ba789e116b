"""Memory planning: the plan line, and the too-long --max-model-len error with both numbers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.config import ConfigError, EngineConfig, ModelConfig, parse_bytes
from engine.errors import MemoryPlanError
from engine.memory_plan import plan_kv_cache

SMOL = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, max_position_embeddings=8192)


def test_parse_bytes() -> None:
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5KiB") == 1536
    with pytest.raises(ConfigError):
        parse_bytes("lots")


def test_plan_numbers() -> None:
    plan = plan_kv_cache(SMOL, EngineConfig(device="cpu", kv_cache_memory="90MiB",
                                            max_model_len=2048, block_size=16, max_num_seqs=64))
    assert plan.spec.bytes_per_token == 2 * 30 * 3 * 64 * 4  # fp32
    assert plan.num_blocks == 90 * 2**20 // (plan.spec.bytes_per_token * 16)
    assert plan.num_tokens == plan.num_blocks * 16
    assert plan.max_concurrent_seqs == plan.num_blocks // (2048 // 16)
    line = plan.line()
    assert f"{plan.num_blocks} blocks" in line and f"{plan.num_tokens} tokens" in line
    assert "90.0 MiB" in line or "MiB" in line
    assert "--max-model-len 2048" in line


def test_too_long_max_model_len_names_both_numbers_and_flags() -> None:
    cfg = EngineConfig(device="cpu", kv_cache_memory="10MiB", max_model_len=8192)
    with pytest.raises(MemoryPlanError) as e:
        plan_kv_cache(SMOL, cfg)
    capacity = (10 * 2**20 // (2 * 30 * 3 * 64 * 4 * 16)) * 16
    msg = str(e.value)
    assert "8192" in msg and str(capacity) in msg
    assert "--max-model-len" in msg and "--kv-cache-memory" in msg


def test_max_model_len_beyond_model_positions() -> None:
    with pytest.raises(MemoryPlanError, match="8192"):
        plan_kv_cache(SMOL, EngineConfig(device="cpu", max_model_len=100000,
                                         kv_cache_memory="100GiB"))


def test_cli_plan_fails_before_loading_weights() -> None:
    """`pdserve plan` / `generate` with a too-long --max-model-len exit 2 with the numbers, fast."""
    cmd = [sys.executable, "-m", "deploy.cli", "generate", "--prompt", "hi",
           "--kv-cache-memory", "4MiB", "--max-model-len", "8192"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "8192" in out.stderr and "--kv-cache-memory" in out.stderr
    assert "loaded" not in out.stderr  # failed before the weights were read

    ok = subprocess.run([sys.executable, "-m", "deploy.cli", "plan", "--kv-cache-memory", "64MiB",
                         "--max-model-len", "1024"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "KV cache:" in ok.stdout and "tokens" in ok.stdout and "concurrent" in ok.stdout
