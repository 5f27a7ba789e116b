"""Remote prefills in flight join the decode batch a local prefill runs beside.

A decode worker with nothing decoding yet may still have remote prompts headed to it; when
their KV lands during a local prefill, they decode beside its chunks. The rule sees them
(`DecodeView.joining`) and keeps each step within the TPOT SLO while they will be there; the
placer and the simulator build that view. Numbers as in test_placement_rule.py.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from engine.kv_spec import KvDtype, KvSpec
from planner.servers import SimRequest
from planner.simulator import ClusterSpec, simulate
from protocol import worker_events as ev
from proxy.cost_model import Coefficients
from proxy.placement import DecodeView, Placement, Slo, TransferView, predict_local
from proxy.placer import Placer
from tests.unit.planner_fixtures import small_profile

MODEL = Coefficients(0.02, 2e-3, 1e-3, 2e-6)
SLO = Slo(3.0, 0.15)
TRANSFER = TransferView(kv_bytes_per_token=23040, bytes_per_second=1e9,
                        remote_overhead_s=0.05, local_overhead_s=0.005)
IDLE = DecodeView("decode-0", MODEL, 0, 0, 0.0, 0, 0, 2048)


def test_a_remote_prompt_landing_during_a_local_prefill_chunks_it() -> None:
    """Idle batch, nothing headed here: the whole prompt in one step. A remote prompt landing in
    0.5 s (before the 1.2 s prefill ends): chunks whose step keeps its TPOT."""
    whole = predict_local(600, IDLE, TRANSFER, SLO)
    assert whole.chunk == 600
    joined = predict_local(600, dataclasses.replace(IDLE, joining=((0.5, 700),)), TRANSFER, SLO)
    assert 0 < joined.chunk < 600
    assert MODEL.step_seconds(joined.chunk, 1, 700) <= SLO.tpot_s
    assert joined.ttft_s > whole.ttft_s  # chunks cost steps: the price of the joiner's TPOT


def test_a_remote_prompt_landing_after_the_local_prefill_changes_nothing() -> None:
    later = dataclasses.replace(IDLE, joining=((5.0, 700),))
    assert predict_local(600, later, TRANSFER, SLO) == predict_local(600, IDLE, TRANSFER, SLO)


def test_batch_during_counts_only_the_sequences_landed_by_then() -> None:
    d = dataclasses.replace(IDLE, num_running=2, context_tokens=300,
                            joining=((0.2, 100), (1.0, 50)))
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


def _hello(worker_id: str, role: str) -> ev.Hello:
    return ev.Hello(worker_id, role, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2",
                    KvSpec(2, 2, 64, 16, dtype=KvDtype.BFLOAT16), "plan", 1, "localhost", "m",
                    2048)


def test_the_placer_sees_remote_prompts_in_flight_as_joining() -> None:
    placer = Placer(Placement.ADAPTIVE, SLO)
    placer.on_hello(_hello("p0", "prefill"))
    placer.on_hello(_hello("d0", "decode"))
    remote = placer.place("r1", list(range(300)), 8, "d0", ["p0"], Placement.REMOTE)
    view = placer._decode_view("d0", [], 10, time.monotonic())
    assert view.num_running == 0 and len(view.joining) == 1
    (land_s, tokens), = view.joining
    assert tokens == 300 and 0.0 <= land_s <= remote.ttft_s
    placer.on_tokens("r1", 1)  # its first token: now it decodes, no longer joining
    view = placer._decode_view("d0", [], 10, time.monotonic())
    assert view.num_running == 1 and view.joining == ()
    placer.on_finished("r1")
    assert placer._decode_view("d0", [], 10, time.monotonic()).joining == ()


@pytest.mark.parametrize("mode", [Placement.LOCAL, Placement.ADAPTIVE])
def test_local_prompts_are_not_joining(mode: Placement) -> None:
    """Local prefills queued on the decode worker are its local queue, not joiners."""
    placer = Placer(mode, SLO)
    placer.on_hello(_hello("d0", "decode"))
    placer.place("r1", list(range(300)), 8, "d0", [], Placement.LOCAL)
    assert placer._decode_view("d0", [], 10, time.monotonic()).joining == ()
