"""Remote prefills in flight join the decode batch a local prefill runs beside.

A decode worker with nothing decoding yet may still have remote prompts headed to it; when
their KV lands during a local prefill, they wait for the step they land in and then decode
beside its chunks. The rule sees them (`DecodeView.joining`) and counts what they wait in their
TPOT; the placer and the simulator build that view. Numbers as in test_placement_rule.py.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from planner.servers import SimRequest
from planner.simulator import ClusterSpec, simulate
from proxy.cost_model import Coefficients
from proxy.placement import (
    DecodeView,
    Joiner,
    Placement,
    PrefillView,
    Slo,
    TransferView,
    predict_local,
    predict_remote,
)
from proxy.placer import Placer
from tests.unit.planner_fixtures import small_profile, worker_hello

MODEL = Coefficients(0.02, 2e-3, 1e-3, 2e-6)
SLO = Slo(3.0, 0.15)
TRANSFER = TransferView(kv_bytes_per_token=23040, bytes_per_second=1e9,
                        remote_overhead_s=0.05, local_overhead_s=0.005)
IDLE = DecodeView("decode-0", MODEL, 0, 0, 0.0, 0, 0, 2048)


def test_a_remote_prompt_landing_early_in_a_local_prefill_chunks_it() -> None:
    """Idle batch, nothing headed here: the whole prompt in one step. A remote prompt of 8
    output tokens landing in 0.2 s (early in the 1.2 s prefill): in one step it would wait 1 s
    for its second token (mean TPOT ~0.15 s); chunked, its TPOT holds."""
    whole = predict_local(600, IDLE, TRANSFER, SLO)
    assert whole.chunk == 600
    joined = predict_local(600, dataclasses.replace(IDLE, joining=(Joiner(0.2, 700, 1.0),),
                                                    horizon_tokens=8), TRANSFER, SLO)
    assert 0 < joined.chunk < 600
    assert joined.tpot_s <= SLO.tpot_s
    assert joined.ttft_s > whole.ttft_s  # chunks cost steps: the price of the joiner's TPOT


def test_a_joiner_that_waits_little_lets_the_prompt_go_whole() -> None:
    """Landing at 1.1 s of the 1.2 s step, it waits 0.1 s for its first token and spreads 0.1 s
    over its 8 tokens: the whole prompt in one step keeps both, and its own first token comes
    soonest. (A sweep on 2026-12-06 saw 700-token local prompts chunked for a joiner landing
    near their end, missing a 3 s TTFT that in one step they met.)"""
    view = dataclasses.replace(IDLE, joining=(Joiner(1.1, 700, 1.0),), horizon_tokens=8)
    p = predict_local(600, view, TRANSFER, SLO)
    assert p.chunk == 600 and p.tpot_s <= SLO.tpot_s


def test_a_joiner_near_its_ttft_limit_is_let_in_between_chunks() -> None:
    """A joiner landing at 0.5 s, predicted to make its first token at 2.8 s of a 3 s SLO: in
    one 1.2 s step it would wait 0.7 s more (3.5 s, a miss). Chunks let it in at the next
    step's end, and the local margin counts its first token."""
    view = dataclasses.replace(IDLE, joining=(Joiner(0.5, 700, 2.8),))
    p = predict_local(600, view, TRANSFER, SLO)
    assert 0 < p.chunk < 600
    assert 0 <= p.margin <= SLO.margin(2.8, 0.0)


def test_a_remote_prompt_landing_during_a_local_step_waits_for_it() -> None:
    """Its KV lands at ~1 s while the decode worker runs a 2 s local prefill in one step
    (no chunk cap): its first token comes when that step ends."""
    prefill = PrefillView("p0", MODEL, 0.0, 0, 2048)
    idle = predict_remote(480, prefill, IDLE, TRANSFER, SLO)
    busy = dataclasses.replace(IDLE, local_queue_s=2.0, local_chunk=2048)
    waited = predict_remote(480, prefill, busy, TRANSFER, SLO)
    assert idle.ttft_s < 2.0
    assert waited.ttft_s == pytest.approx(2.0)


def test_a_remote_prompt_landing_after_the_local_prefill_changes_nothing() -> None:
    later = dataclasses.replace(IDLE, joining=(Joiner(5.0, 700, 6.0),))
    assert predict_local(600, later, TRANSFER, SLO) == predict_local(600, IDLE, TRANSFER, SLO)


def test_batch_during_counts_only_the_sequences_landed_by_then() -> None:
    d = dataclasses.replace(IDLE, num_running=2, context_tokens=300,
                            joining=(Joiner(0.2, 100, 1.0), Joiner(1.0, 50, 2.0)))
    assert d.batch_during(0.1) == (2, 300)
    assert d.batch_during(0.5) == (3, 400)
    assert d.batch_during(2.0) == (4, 450)


def test_the_simulated_joiner_keeps_its_tpot() -> None:
    """Request 0 goes remote and lands at 1.5 s; request 1 (2000 tokens, at 0.3 s) is local.
    Prefilled in one 2 s step, it stalled request 0's stream (TPOT 137 ms of a 100 ms SLO);
    chunked, request 0 keeps its TPOT."""
    spec = ClusterSpec(1, 1, "adaptive", slo_ttft_s=3.0, slo_tpot_s=0.1)
    first, second = simulate(small_profile(), spec,
                             [SimRequest(0.0, 1500, 8), SimRequest(0.3, 2000, 8)])
    assert (first.placement, second.placement) == ("remote", "local")
    assert first.tpot_s is not None and first.tpot_s <= 0.1
    assert second.ttft_s <= 3.0



def test_the_placer_sees_remote_prompts_in_flight_as_joining() -> None:
    placer = Placer(Placement.ADAPTIVE, SLO)
    placer.on_hello(worker_hello("p0", "prefill"))
    placer.on_hello(worker_hello("d0", "decode"))
    remote = placer.place("r1", list(range(300)), 8, "d0", ["p0"], Placement.REMOTE)
    view = placer._decode_view("d0", [], 10, time.monotonic())
    assert view.num_running == 0 and len(view.joining) == 1
    (land_s, tokens, _), = view.joining
    assert tokens == 300 and 0.0 <= land_s <= remote.ttft_s
    assert view.horizon_tokens == 8  # a stall is spread over the joiner's output (max_tokens)
    placer.on_tokens("r1", 1)  # its first token: now it decodes, no longer joining
    view = placer._decode_view("d0", [], 10, time.monotonic())
    assert view.num_running == 1 and view.joining == ()
    placer.on_finished("r1")
    assert placer._decode_view("d0", [], 10, time.monotonic()).joining == ()


@pytest.mark.parametrize("mode", [Placement.LOCAL, Placement.ADAPTIVE])
def test_local_prompts_are_not_joining(mode: Placement) -> None:
    """Local prefills queued on the decode worker are its local queue, not joiners."""
    placer = Placer(mode, SLO)
    placer.on_hello(worker_hello("d0", "decode"))
    placer.place("r1", list(range(300)), 8, "d0", [], Placement.LOCAL)
    assert placer._decode_view("d0", [], 10, time.monotonic()).joining == ()
