"""The CUDA path's fused model pass (engine/triton_layers.py) keeps every decoder layer a module
call, so a forward hook on a layer runs once that layer has written its K/V. Layer-wise KV
streaming sends each layer group from such a hook (prefill/layer_stream.py); on issue 17's H100
run the fused pass called no layer module, no hook ran, and only the last part (one group of
the last chunk) left: one group's bytes, the later tokens different.

Runs wherever triton is importable (the GPU machines; on CPU with triton installed): the pass's
kernels are swapped for torch equivalents, so this checks the pass itself (the order of the
layers, the hooks, the deferred residual add) on CPU; the kernels are tests/gpu's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from engine import attention
from engine.kv_layout import allocate_cache
from engine.llm_engine import LLMEngine
from engine.model import LlamaForCausalLM, RMSNorm
from engine.model_runner import ModelRunner, ScheduledSeq
from engine.rope import RotaryEmbedding
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

triton_layers = pytest.importorskip("engine.triton_layers", exc_type=ImportError)


def _add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, norm: RMSNorm) -> torch.Tensor:
    if h is not None:
        x.add_(h)
    return norm(x)


def _rope(qkv: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, layer_cache: Any,
          slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
          head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_width].reshape(-1, num_heads, head_dim)
    k = qkv[:, q_width:q_width + kv_width].reshape(-1, num_kv_heads, head_dim)
    return rope(positions, q, k)  # K/V reach the cache in `_attend` (torch's write)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_cache: Any, meta: Any,
            scale: float, kv_written: bool) -> torch.Tensor:
    return attention.paged_attention(q, k, v, layer_cache, meta, scale)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    n = gate_up.shape[1] // 2
    return F.silu(gate_up[:, :n]) * gate_up[:, n:]


@pytest.fixture
def runner(tiny_engine: Callable[..., LLMEngine], monkeypatch: pytest.MonkeyPatch) -> ModelRunner:
    for name, fn in [("add_rms_norm", _add_rms_norm), ("rope_and_write_kv", _rope),
                     ("paged_attention", _attend), ("silu_mul", _silu_mul)]:
        monkeypatch.setattr(triton_layers, name, fn)
    return tiny_engine(device="cpu").runner  # the op-by-op model, the torch attention


def _fused(runner: ModelRunner) -> LlamaForCausalLM:
    """The runner's model, rebuilt as the CUDA path builds it (on CPU), with its weights."""
    with torch.device("meta"):
        model = LlamaForCausalLM(runner.config, runner.plan.max_model_len)
    model = model.to_empty(device=runner.device).to(runner.dtype)
    model.model.rope.build(runner.device)
    triton_layers.apply_fused_layers(model)
    model.load_weights(dict(runner.model.named_parameters()))
    return model.eval()


@torch.inference_mode()
def test_fused_pass_runs_layer_hooks_after_each_layer_wrote_its_kv(runner: ModelRunner) -> None:
    fused, spec = _fused(runner), runner.plan.spec
    seq = Sequence("r", list(range(1, 20)), SamplingParams(max_tokens=1))
    seq.block_table = [0, 1, 2]
    input_ids, positions, meta = runner.prepare([ScheduledSeq(seq, 19)])
    caches = allocate_cache(spec, runner.plan.num_blocks, runner.device)
    written: list[list[bool]] = []  # at each hook: which layers hold the step's K/V

    def hook(module: Any, inputs: Any, output: Any) -> None:
        written.append([bool(c[0].abs().sum() > 0) for c in caches])

    for layer in fused.model.layers:
        layer.register_forward_hook(hook)
    hidden = fused(input_ids, positions, caches, meta)
    num_layers = len(caches)
    assert written == [[i <= n for i in range(num_layers)] for n in range(num_layers)]
    # the same hidden states as the op-by-op model (the residual add deferred to the next layer)
    want = runner.model(input_ids, positions, runner.kv_caches, meta)
    torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
