"""The engine runs on every cache layout it supports (NHD, HND, paged-attention v1, stacked or
not, fp32/fp16/bf16) and gives the same greedy tokens as with its default NHD fp32 cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.kv_layout import allocate_cache, gather_kv, write_kv
from engine.kv_spec import KvDtype, KvLayout, KvSpec
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


@pytest.mark.parametrize(("layout", "stacked"), [
    (KvLayout.NHD, True), (KvLayout.NHD, False), (KvLayout.HND, True), (KvLayout.HND, False),
    (KvLayout.PAGED_V1, False)])  # paged-v1 always keeps K and V separate
def test_write_then_gather_roundtrip(layout: KvLayout, stacked: bool) -> None:
    spec = KvSpec(num_layers=1, num_kv_heads=3, head_dim=16, block_size=4, dtype=KvDtype.FLOAT32,
                  layout=layout, is_kv_stacked=stacked)
    layer = allocate_cache(spec, 6, torch.device("cpu"))[0]
    table = torch.tensor([5, 1, 3])
    slots = torch.cat([table[i // 4:i // 4 + 1] * 4 + i % 4 for i in range(10)])
    k, v = torch.randn(10, 3, 16), torch.randn(10, 3, 16)
    write_kv(spec, layer, k, v, slots)
    got_k, got_v = gather_kv(spec, layer, table, 10)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    batched_k, _ = gather_kv(spec, layer, table.unsqueeze(0).repeat(2, 1), 10)
    assert torch.equal(batched_k[1], k)


@pytest.mark.parametrize(("layout", "dtype"), [("HND", "auto"), ("paged_v1", "auto"),
                                                ("paged_v1", "float16"), ("NHD", "bfloat16")])
def test_engine_greedy_same_on_every_layout(tiny_hf_checkpoint: Callable[[str], Path], layout: str,
                                            dtype: str) -> None:
    path = str(tiny_hf_checkpoint("llama_gqa"))
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42] * 30, [7, 9, 11]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run(**kw: str) -> list[list[int]]:
        cfg = EngineConfig(model=path, kv_cache_memory="4MiB", max_model_len=128, block_size=8,
                           **kw)
        engine = LLMEngine.from_config(cfg, log_plan=False)
        return [s.output_ids for s in engine.generate(prompts, params)]

    want = run()
    got = run(kv_cache_layout=layout, kv_cache_dtype=dtype)
    if dtype == "auto":
        assert got == want
    else:  # a 16-bit cache rounds K/V: the first tokens must agree
        assert all(g[:4] == w[:4] for g, w in zip(got, want, strict=True))
