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


def test_materialize_keeps_tied_tensors_tied_and_casts_floats() -> None:
    """The meta model's parameters get storage of the engine's dtype on the device (what
    `to_empty(...).to(dtype)` did, without its per-tensor Python reference ops); a parameter
    two modules share (tied embeddings) is still one tensor; integer buffers keep their type."""
    import torch

    from engine.model_runner import materialize

    with torch.device("meta"):
        embed, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
        head.weight = embed.weight
        model = torch.nn.ModuleList([embed, head])
        model.register_buffer("ids", torch.zeros(3, dtype=torch.int64))
    materialize(model, torch.device("cpu"), torch.float16)
    assert model[0].weight is model[1].weight
    assert isinstance(model[0].weight, torch.nn.Parameter)
    assert (model[0].weight.dtype, model[0].weight.device.type) == (torch.float16, "cpu")
    assert model.ids.dtype == torch.int64 and not model.ids.is_meta
    assert [n for n, _ in model.named_parameters()] == ["0.weight"]  # one tensor, still tied
