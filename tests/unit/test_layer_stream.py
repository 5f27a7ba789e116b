"""Layer-wise streaming between real workers, in-process (`--kv-streaming layerwise`): a chunked
prefill's KV goes out as (cached prefix) + chunk x layer-group parts while the model computes,
the decode worker admits the sequence after the last part, and its tokens equal a colocated
engine's (with a prefix-cache hit too), also when the forward pass runs the layers without
their hooks (the groups then go after the step); aborts and a reservation gone mid-stream free
every block on both sides. Tiny random-weight engines (2 layers, 8-token blocks; a step budget of 8
tokens puts the 20-token prompt in 3 chunks)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from worker_fakes import (
    PROMPT,
    WAIT_S,
    FakeProxy,
    assert_all_free,
    kv_spec_of,
    prefill,
    reserve,
    sampling,
)

from decode.worker import DecodeWorker
from engine.llm_engine import LLMEngine
from engine.model import LlamaModel
from prefill.layer_stream import layer_groups
from prefill.worker import PrefillWorker
from protocol import decode_ctrl as dmsg
from protocol import prefill_ctrl as pmsg
from protocol import worker_events as ev
from protocol.errors import ErrorCode
from worker.config import KvTransportConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LAYERWISE = KvTransportConfig(kv_streaming="layerwise", kv_stream_groups=2)
CHUNKED = {"max_num_batched_tokens": 8}


def workers(proxy: FakeProxy, make_worker: Any,
            **engine: Any) -> tuple[DecodeWorker, PrefillWorker, list]:
    """A decode worker and a streaming prefill worker (`engine`: overrides for both engines; on
    CPU unless it says otherwise); the list collects the prefill worker's parts' markers."""
    engine = {"device": "cpu", **engine}
    d = make_worker(DecodeWorker, proxy.config("d0"), **engine)
    p = make_worker(PrefillWorker, proxy.config("p0", kv=LAYERWISE), **CHUNKED, **engine)
    parts: list[tuple[str, int, int, tuple[int, int], tuple[int, bool]]] = []
    send_part = p.kv.send_part

    def spy(rid: str, address: str, table: list[int], t0: int, t1: int,
            layers: tuple[int, int], *args: Any, **kw: Any) -> None:
        parts.append((rid, t0, t1, layers, args[-2]))
        send_part(rid, address, table, t0, t1, layers, *args, **kw)

    p.kv.send_part = spy  # type: ignore[method-assign]
    return d, p, parts


def first_parts(p: PrefillWorker, parts: list) -> None:
    """Step the prefill worker until the first chunk's parts are queued (bounded)."""
    deadline = time.monotonic() + WAIT_S
    while not parts:
        assert time.monotonic() < deadline, "no part was queued"
        p.do_work()


def run_one(proxy: FakeProxy, d: DecodeWorker, p: PrefillWorker, rid: str,
            max_tokens: int = 5, prompt: list[int] = PROMPT) -> list[int]:
    params = sampling(max_tokens=max_tokens)
    proxy.send(d, reserve(rid, prompt, params=params))
    blocks = proxy.wait_event(ev.Reserved, rid).block_ids
    proxy.send(p, prefill(rid, "d0", d.kv_address, blocks, kv_spec_of(d), prompt, params=params))
    out = proxy.stream(rid, drive=(p, d))
    proxy.wait_event(ev.PrefillDone, rid, drive=(p,))
    return [t for e in out for t in e.token_ids]


def test_layer_groups_taper_at_both_ends() -> None:
    def sizes(layers: int, groups: int) -> list[int]:
        got = layer_groups(layers, groups)
        assert got[0][0] == 0 and got[-1][1] == layers  # every layer once, in order
        assert all(a[1] == b[0] for a, b in itertools.pairwise(got))
        return [end - start for start, end in got]
    assert sizes(30, 6) == [2, 4, 9, 9, 4, 2]  # SmolLM2: the end parts 1/15 of the KV
    assert sizes(32, 6) == [2, 5, 9, 9, 5, 2]  # Llama-3-8B
    assert sizes(30, 4) == [5, 10, 10, 5]
    assert sizes(30, 3) == [8, 14, 8]
    assert sizes(30, 2) == [15, 15]  # too few groups to taper: even
    assert sizes(30, 16) == [2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2]  # too few layers
    assert sizes(2, 4) == [1, 1]
    assert sizes(5, 1) == [5]


def chunk_parts(num_tokens: int) -> list[tuple[int, int, tuple[int, int], tuple[int, bool]]]:
    """The parts of a `num_tokens` prompt with no cache hit: 8-token chunks x 2 groups."""
    spans = [(t0, min(t0 + 8, num_tokens)) for t0 in range(0, num_tokens, 8)]
    cells = [(t0, t1, group) for t0, t1 in spans for group in ((0, 1), (1, 2))]
    return [(t0, t1, group, (i, i == len(cells) - 1)) for i, (t0, t1, group) in enumerate(cells)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streams_every_group_and_equals_colocated(
        proxy: FakeProxy, make_worker: Any, tiny_engine: Callable[..., LLMEngine],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17's GPU check, small: the fused CUDA pass runs the group hooks (engine/
    triton_layers.py), a 1-token last chunk (a CUDA graph replay: no hook runs) still sends
    every group (LayerStreamer.end_step), and the tokens equal a colocated CUDA engine's."""
    d, p, parts = workers(proxy, make_worker, device="cuda")
    assert p.engine.runner.attention_backend == "triton"
    colocated = tiny_engine(device="cuda", **CHUNKED)
    # no common prefix (no cache hit); the 17-token prompt ends with a 1-token chunk
    for rid, prompt in (("r1", PROMPT), ("r2", [t + 1 for t in PROMPT[:17]])):
        want = colocated.generate([prompt], sampling(max_tokens=5))[0].output_ids
        parts.clear()
        assert run_one(proxy, d, p, rid, prompt=prompt) == want
        assert [(t0, t1, layers, part) for _, t0, t1, layers, part in parts] == \
            chunk_parts(len(prompt))
    assert_all_free(d)
    assert_all_free(p)


def test_chunked_prefill_streams_parts_and_equals_colocated(
        proxy: FakeProxy, make_worker: Any, tiny_engine: Callable[..., LLMEngine]) -> None:
    d, p, parts = workers(proxy, make_worker)
    want = tiny_engine(device="cpu").generate([PROMPT], sampling(max_tokens=5))[0].output_ids
    assert run_one(proxy, d, p, "r1") == want
    # 3 chunks x 2 groups, in order; the last group of the last chunk last
    assert [(t0, t1, layers, part) for _, t0, t1, layers, part in parts] == [
        (0, 8, (0, 1), (0, False)), (0, 8, (1, 2), (1, False)), (8, 16, (0, 1), (2, False)),
        (8, 16, (1, 2), (3, False)), (16, 20, (0, 1), (4, False)), (16, 20, (1, 2), (5, True))]
    # a prefix-cache hit on the prefill worker: the cached blocks go first, all layers at once
    parts.clear()
    assert run_one(proxy, d, p, "r2") == want
    assert parts[0][1:4] == (0, 16, (0, 2)) and parts[-1][4] == (len(parts) - 1, True)
    assert_all_free(d)
    assert_all_free(p)


def bypass_layer_hooks(model: LlamaModel) -> None:
    """Run `model`'s layers without module calls, so their forward hooks never run: what a CUDA
    graph replay does, and what the fused CUDA pass (engine/triton_layers.py) did on issue 17's
    H100 run (only the last part went out: one layer group's bytes)."""
    def forward(input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                meta: Any) -> torch.Tensor:
        x = model.embed_tokens(input_ids)
        for layer, kv_cache in zip(model.layers, kv_caches, strict=True):
            x = layer.forward(x, positions, model.rope, kv_cache, meta)
        return model.norm(x)

    model.forward = forward  # type: ignore[method-assign]


def test_groups_whose_hooks_did_not_run_still_go(
        proxy: FakeProxy, make_worker: Any, tiny_engine: Callable[..., LLMEngine]) -> None:
    d, p, parts = workers(proxy, make_worker)
    bypass_layer_hooks(p.engine.runner.model.model)
    want = tiny_engine(device="cpu").generate([PROMPT], sampling(max_tokens=5))[0].output_ids
    assert run_one(proxy, d, p, "r1") == want
    assert [(t0, t1, layers, part) for _, t0, t1, layers, part in parts] == chunk_parts(20)
    assert_all_free(d)
    assert_all_free(p)


def test_abort_mid_stream_frees_both_sides(proxy: FakeProxy, make_worker: Any) -> None:
    d, p, parts = workers(proxy, make_worker)
    proxy.send(d, reserve("r1"))
    blocks = proxy.wait_event(ev.Reserved, "r1").block_ids
    proxy.send(p, prefill("r1", "d0", d.kv_address, blocks, kv_spec_of(d)))
    first_parts(p, parts)
    proxy.send(p, pmsg.Abort("r1"))
    proxy.send(d, dmsg.Abort("r1"))
    failed = [proxy.wait_event(ev.RequestFailed, "r1", drive=(p, d)) for _ in range(2)]
    assert sorted((f.worker_id, f.code) for f in failed) == [("d0", ErrorCode.ABORTED),
                                                             ("p0", ErrorCode.ABORTED)]
    proxy.assert_no_event("r1", drive=(p, d), for_s=1.0)  # and nothing more
    assert not p.jobs and len(parts) < 6
    assert_all_free(p)
    assert_all_free(d)


def test_reservation_gone_mid_stream_fails_the_request(proxy: FakeProxy,
                                                       make_worker: Any) -> None:
    d, p, parts = workers(proxy, make_worker)
    proxy.send(d, reserve("r1"))
    blocks = proxy.wait_event(ev.Reserved, "r1").block_ids
    proxy.send(p, prefill("r1", "d0", d.kv_address, blocks, kv_spec_of(d)))
    first_parts(p, parts)
    proxy.send(d, dmsg.Abort("r1"))  # the decode side drops it; the prefill side goes on
    failed = {f.worker_id: f for f in (proxy.wait_event(ev.RequestFailed, "r1", drive=(p, d))
                                       for _ in range(2))}  # the decode side says ABORTED
    assert failed["p0"].code is ErrorCode.KV_REFUSED
    proxy.assert_no_event("r1", drive=(p, d))
    assert not p.jobs
    assert_all_free(p)
    assert_all_free(d)
