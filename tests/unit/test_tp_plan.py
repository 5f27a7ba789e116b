"""Tensor-parallel sharding arithmetic (engine/tp_plan.py), the compact step message
(engine/step_inputs.py) and the loaders' shard reads, with no process group.

A TP size the model cannot be cut by is a ConfigError naming the flag and the numbers; every
rank's shards put back together are the full tensor; a GGUF shard read (rows, or whole
quantization blocks of columns) equals the same cut of the fully dequantized tensor.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ConfigError, EngineConfig, ModelConfig
from engine.gguf_loader import dequantize_tensor, hf_tensor_name, read_gguf
from engine.memory_plan import plan_kv_cache
from engine.safetensors_loader import read_shard
from engine.step_inputs import StepInputs, payload_len, unpack_step
from engine.tp_plan import TpPlan

SMOLLM2_SHAPE = ModelConfig("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                            num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
GQA = replace(SMOLLM2_SHAPE, num_heads=8, num_kv_heads=2, vocab_size=49153)


@pytest.mark.parametrize(("cfg", "tp", "words"), [
    (SMOLLM2_SHAPE, 2, ["--tensor-parallel-size 2", "9 attention heads", "[1, 3, 9]"]),
    (SMOLLM2_SHAPE, 4, ["--tensor-parallel-size 4", "9 attention heads"]),
    (replace(SMOLLM2_SHAPE, num_heads=12, num_kv_heads=6), 4,
     ["--tensor-parallel-size 4", "6 KV heads", "[1, 2, 3, 6, 12]"]),
    (replace(SMOLLM2_SHAPE, intermediate_size=1537), 3, ["--tensor-parallel-size 3", "1537"]),
])
def test_tp_size_that_does_not_fit_the_model_names_flag_and_numbers(
        cfg: ModelConfig, tp: int, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        TpPlan(cfg, 0, tp)
    for word in words:
        assert word in str(err.value)
    with pytest.raises(ConfigError, match="--tensor-parallel-size"):  # the memory plan checks too
        plan_kv_cache(cfg, EngineConfig(tensor_parallel_size=tp, device="cpu"))


@pytest.mark.parametrize("value", [0, -1])
def test_tp_size_must_be_positive(value: int) -> None:
    with pytest.raises(ConfigError, match="--tensor-parallel-size"):
        EngineConfig(tensor_parallel_size=value)


@pytest.mark.parametrize(("cfg", "tp", "kv_heads", "replicas", "kv_starts"), [
    (SMOLLM2_SHAPE, 3, 1, 1, [0, 1, 2]),
    (GQA, 2, 1, 1, [0, 1]),
    (GQA, 4, 1, 2, [0, 0, 1, 1]),  # more ranks than KV heads: replicated, as vLLM does
    (GQA, 8, 1, 4, [0, 0, 0, 0, 1, 1, 1, 1]),
])
def test_kv_heads_split_or_replicated(cfg: ModelConfig, tp: int, kv_heads: int, replicas: int,
                                      kv_starts: list[int]) -> None:
    plans = [TpPlan(cfg, r, tp) for r in range(tp)]
    assert [p.kv_head_start for p in plans] == kv_starts
    assert all(p.num_kv_heads == kv_heads and p.kv_head_replicas == replicas for p in plans)
    group = cfg.num_heads // cfg.num_kv_heads
    for p in plans:  # every query head of a rank reads a KV head the rank holds
        first_q = p.rank * p.num_heads
        heads_needed = {(first_q + h) // group for h in range(p.num_heads)}
        assert heads_needed <= set(range(p.kv_head_start, p.kv_head_start + p.num_kv_heads))
    spec = plan_kv_cache(cfg, EngineConfig(tensor_parallel_size=tp, device="cpu",
                                           kv_cache_memory="64MiB"), tp_rank=tp - 1).spec
    assert (spec.num_kv_heads, spec.tp_size, spec.kv_head_replicas) == (kv_heads, tp, replicas)
    assert spec.head_range == (kv_starts[-1], kv_starts[-1] + kv_heads)


def test_shards_put_back_together_are_the_full_tensors() -> None:
    tp, cfg = 2, GQA
    full = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, 8),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(cfg.num_heads * 64, 8),
            "model.layers.0.self_attn.q_proj.bias": torch.randn(cfg.num_heads * 64),
            "model.layers.0.self_attn.o_proj.weight": torch.randn(8, cfg.num_heads * 64),
            "model.layers.0.mlp.down_proj.weight": torch.randn(8, cfg.intermediate_size),
            "model.layers.0.input_layernorm.weight": torch.randn(8)}
    for name, tensor in full.items():
        parts = [read_shard(tensor, TpPlan(cfg, r, tp).shard(name)) for r in range(tp)]
        dim = TpPlan(cfg, 0, tp).shard(name).dim if TpPlan(cfg, 0, tp).shard(name) else None
        if dim is None:
            assert all(torch.equal(p, tensor) for p in parts), name
            continue
        whole = torch.cat(parts, dim=dim)
        assert torch.equal(whole.narrow(dim, 0, tensor.shape[dim]), tensor), name
        assert not whole.narrow(dim, tensor.shape[dim],
                                whole.shape[dim] - tensor.shape[dim]).any(), "padding is zero"
    assert TpPlan(cfg, 1, tp).local_shape("model.embed_tokens.weight", (cfg.vocab_size, 8)) == (
        24577, 8)


def test_gguf_shard_reads_equal_cuts_of_the_whole_tensor(smollm2_gguf_path: Path) -> None:
    import mmap

    gf = read_gguf(smollm2_gguf_path)
    plan = TpPlan(SMOLLM2_SHAPE, 1, 3)
    names = ["blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight",
             "blk.0.attn_k.weight", "token_embd.weight", "blk.0.attn_norm.weight"]
    with open(gf.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for name in names:
            info = gf.tensors[name]
            shard = plan.shard(hf_tensor_name(name) or "")
            whole = dequantize_tensor(buf, gf.data_offset, info).copy()  # F32: views of the map
            part = dequantize_tensor(buf, gf.data_offset, info, shard).copy()
            if shard is None:
                np.testing.assert_array_equal(part, whole)
                continue
            index = (slice(None),) * shard.dim + (slice(shard.start, shard.stop),)
            np.testing.assert_array_equal(part, whole[index], err_msg=name)


def test_step_inputs_round_trip() -> None:
    rng = np.random.default_rng(0)
    inputs = StepInputs(*(rng.integers(0, 1000, n).astype(np.int64) for n in (7, 7, 7)),
                        rng.integers(0, 50, (3, 4)).astype(np.int64),
                        np.array([2, 6], dtype=np.int64), np.array([0, 3, 6, 7], dtype=np.int64),
                        np.array([3, 9, 12], dtype=np.int64))
    header, payload = inputs.header(), inputs.payload()
    assert payload_len(header) == payload.size and payload.dtype == np.int64
    back = unpack_step(header, payload)
    for name in inputs.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(back, name), getattr(inputs, name), err_msg=name)
