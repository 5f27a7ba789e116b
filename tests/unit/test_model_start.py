"""A worker's start-up cost: building an engine imports no `torch._dynamo` (several seconds of
imports per process on a small CPU, paid by every worker and tensor-parallel rank). The model is
built on the meta device, where a random init (`nn.Embedding`'s `normal_`) or a factory call
(`torch.arange` for the rotary tables) runs torch's Python references, which import it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

BUILD = """
import sys
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
LLMEngine.from_config(EngineConfig(model=sys.argv[1], block_size=8, max_model_len=64,
                                   kv_cache_memory="4MiB"), log_plan=False)
print(sorted(m for m in sys.modules if m.startswith("torch._dynamo"))[:3])
"""


def test_building_an_engine_imports_no_dynamo(tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    path = tiny_hf_checkpoint("llama3_rope")  # the scaled rotary tables too
    out = subprocess.run([sys.executable, "-c", BUILD, str(path)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
