"""The placement rule against synthetic cost models: each boundary picks what it should.

Numbers are CPU-like: a worker step costs 20 ms + 2 ms per prefill token + 1 ms per decode
sequence + 2 us per context token; SLOs TTFT 3 s / TPOT 150 ms unless a test says otherwise.
"""

from __future__ import annotations

import dataclasses

import pytest

from proxy.cost_model import Coefficients
from proxy.placement import (
    REMOTE_FIRST,
    REMOTE_SAFE,
    DecodeView,
    Placement,
    PrefillView,
    Slo,
    TransferView,
    choose,
    learn_overhead,
    predict_local,
    predict_remote,
    prefill_seconds,
)

MODEL = Coefficients(0.02, 2e-3, 1e-3, 2e-6)
SLO = Slo(3.0, 0.15)
TRANSFER = TransferView(kv_bytes_per_token=23040, bytes_per_second=1e9,
                        remote_overhead_s=0.05, local_overhead_s=0.005)


def prefill(queue_s: float = 0.0, cached: int = 0, wid: str = "prefill-0") -> PrefillView:
    return PrefillView(wid, MODEL, queue_s, cached, 2048)


def decode(running: int = 0, context: int = 0, local_queue_s: float = 0.0, cached: int = 0,
           model: Coefficients = MODEL) -> DecodeView:
    return DecodeView("decode-0", model, running, context, local_queue_s, 0, cached, 2048)


def test_idle_cluster_long_prompt_busy_decode_goes_remote() -> None:
    """A decode worker with a running batch: a long local prefill would stretch its steps, an
    idle prefill worker would not."""
    got = choose(Placement.ADAPTIVE, 1500, [prefill()], decode(running=12, context=12 * 600),
                 TRANSFER, SLO)
    assert got.placement is Placement.REMOTE and got.prefill_id == "prefill-0"


def test_short_prompt_goes_local() -> None:
    """Hops and transfer cost more than prefilling 12 tokens beside the batch."""
    got = choose(Placement.ADAPTIVE, 12, [prefill()], decode(running=4, context=2000),
                 TRANSFER, SLO)
    assert got.placement is Placement.LOCAL


def test_saturated_prefill_pool_sends_prompts_local() -> None:
    d = decode(running=1, context=600)
    assert choose(Placement.ADAPTIVE, 600, [prefill(queue_s=0.0)], d, TRANSFER,
                  SLO).placement is Placement.REMOTE
    busy = choose(Placement.ADAPTIVE, 600, [prefill(queue_s=4.0)], d, TRANSFER, SLO)
    assert busy.placement is Placement.LOCAL
    assert 0 < busy.chunk < 600  # chunked so the running sequence keeps its TPOT
    assert busy.tpot_s <= SLO.tpot_s


def test_the_least_busy_prefill_worker_is_predicted_best() -> None:
    got = choose(Placement.ADAPTIVE, 900, [prefill(2.0, wid="p-busy"), prefill(0.1, wid="p-idle")],
                 decode(running=10, context=5000), TRANSFER, SLO)
    assert (got.placement, got.prefill_id) == (Placement.REMOTE, "p-idle")


def test_a_cached_prefix_on_the_decode_worker_brings_the_prompt_local() -> None:
    d = decode(running=6, context=3000)
    assert choose(Placement.ADAPTIVE, 1000, [prefill()], d, TRANSFER,
                  SLO).placement is Placement.REMOTE
    cached = dataclasses.replace(d, cached_tokens=992)
    assert choose(Placement.ADAPTIVE, 1000, [prefill()], cached, TRANSFER,
                  SLO).placement is Placement.LOCAL


def test_decode_worker_near_its_tpot_limit_sends_even_short_prompts_away() -> None:
    """At 28 running sequences a step takes ~140 ms of a 150 ms TPOT SLO: any local chunk
    breaks it, while a remote prompt only adds one sequence."""
    d = decode(running=28, context=28 * 1000)
    assert MODEL.step_seconds(0, 28, 28000) < SLO.tpot_s
    got = choose(Placement.ADAPTIVE, 64, [prefill()], d, TRANSFER, SLO)
    assert got.placement is Placement.REMOTE


def test_no_live_prefill_worker_means_local_whatever_the_mode() -> None:
    for mode in Placement:
        assert choose(mode, 2000, [], decode(), TRANSFER, SLO).placement is Placement.LOCAL


def test_forced_modes() -> None:
    d = decode(running=2, context=100)
    assert choose(Placement.REMOTE, 4, [prefill()], d, TRANSFER, SLO).placement \
        is Placement.REMOTE
    assert choose(Placement.LOCAL, 4000, [prefill()], decode(running=20, context=9000),
                  TRANSFER, SLO).placement is Placement.LOCAL


def test_when_neither_meets_the_slo_the_smaller_miss_wins() -> None:
    slo = Slo(0.5, 0.15)  # a 2000-token prompt cannot reach its first token in 0.5 s anywhere
    d = decode(running=2, context=1000)
    remote = predict_remote(2000, prefill(queue_s=10.0), d, TRANSFER, slo)
    local = predict_local(2000, d, TRANSFER, slo)
    assert remote.margin < 0 and local.margin < 0
    got = choose(Placement.ADAPTIVE, 2000, [prefill(queue_s=10.0)], d, TRANSFER, slo)
    assert got.placement is (Placement.LOCAL if local.margin > remote.margin
                             else Placement.REMOTE)
    assert got.margin == max(local.margin, remote.margin)


def test_slow_transfer_link_keeps_long_prompts_local() -> None:
    """A 10 MB/s link makes 1000 tokens of KV (22 MiB) a two-second transfer."""
    slow = dataclasses.replace(TRANSFER, bytes_per_second=1e7)
    d = decode(running=1, context=500)
    assert choose(Placement.ADAPTIVE, 1000, [prefill()], d, TRANSFER,
                  SLO).placement is Placement.REMOTE
    assert choose(Placement.ADAPTIVE, 1000, [prefill()], d, slow,
                  SLO).placement is Placement.LOCAL


def test_prefill_seconds_counts_chunks_and_the_short_last_one() -> None:
    model = Coefficients(0.01, 1e-3, 0.0, 0.0)
    assert prefill_seconds(model, 1000, 2048) == pytest.approx(0.01 + 1.0)
    assert prefill_seconds(model, 1000, 256) == pytest.approx(4 * 0.01 + 1.0)
    assert prefill_seconds(model, 0, 256) == 0.0


def test_slo_validation() -> None:
    with pytest.raises(ValueError, match="positive"):
        Slo(0.0, 0.1)
    assert Slo(1.0, 0.1).margin(0.5, 0.05) == pytest.approx(0.5)


def test_local_prefills_already_queued_on_the_decode_worker_send_the_next_one_away() -> None:
    """Self-regulation: the queued local work counts against the running batch's TPOT."""
    d = decode(running=8, context=4000)
    d = dataclasses.replace(d, horizon_tokens=48)
    assert choose(Placement.ADAPTIVE, 128, [prefill(queue_s=0.5)], d, TRANSFER,
                  SLO).placement is Placement.LOCAL
    loaded = dataclasses.replace(d, local_queue_s=2.5, local_chunk=128)
    assert choose(Placement.ADAPTIVE, 128, [prefill(queue_s=0.5)], loaded, TRANSFER,
                  SLO).placement is Placement.REMOTE


def test_a_long_prompt_goes_remote_while_the_prefill_worker_meets_the_slos() -> None:
    """Local would be a little sooner on an idle cluster (no transfer, no hops), but it holds
    the decode worker for the whole prefill: remote first, local as the overflow."""
    slo = Slo(3.0, 0.3)
    d = decode()
    local = predict_local(600, d, TRANSFER, slo)
    remote = predict_remote(600, prefill(), d, TRANSFER, slo)
    assert local.ttft_s < remote.ttft_s and remote.margin >= 0
    assert choose(Placement.ADAPTIVE, 600, [prefill()], d, TRANSFER, slo).placement \
        is Placement.REMOTE
    # the prefill worker holds 1.5 s of queued work: now only local meets the TTFT SLO well
    assert choose(Placement.ADAPTIVE, 600, [prefill(queue_s=1.5)], d, TRANSFER, slo).placement \
        is Placement.LOCAL


def test_the_remote_first_bias_fades_as_the_remote_margin_nears_zero() -> None:
    """Local sooner by less than the full remote-first bias (0.25 x its prefill over the TTFT
    SLO): remote while it meets the SLOs with room; local when remote barely meets them (a
    prediction error from a miss), where what is left of the bias (`REMOTE_SAFE`) is smaller
    than local's lead."""
    slo = Slo(3.0, 0.3)

    def case(local_queue_s: float, prefill_queue_s: float) -> tuple[float, float, Placement]:
        d = dataclasses.replace(decode(), local_queue_s=local_queue_s, local_chunk=2048)
        local = predict_local(600, d, TRANSFER, slo)
        remote = predict_remote(600, prefill(queue_s=prefill_queue_s), d, TRANSFER, slo)
        lead = (remote.ttft_s - local.ttft_s) / slo.ttft_s
        full_bias = REMOTE_FIRST * min(local.prefill_s / slo.ttft_s, 1.0)
        assert 0 < lead < full_bias and local.margin < remote.margin + full_bias
        got = choose(Placement.ADAPTIVE, 600, [prefill(queue_s=prefill_queue_s)], d,
                     TRANSFER, slo)
        return remote.margin, lead / full_bias, got.placement

    roomy, _, placement = case(0.9, 0.95)
    assert roomy >= REMOTE_SAFE and placement is Placement.REMOTE
    tight, share, placement = case(1.44, 1.57)
    assert 0 <= tight < REMOTE_SAFE * share  # the faded bias is under local's lead
    assert placement is Placement.LOCAL


def test_a_ttft_correction_learns_the_hops_within_bounds() -> None:
    slo = Slo(3.0, 0.3)
    overhead = 0.0
    for _ in range(30):
        overhead = learn_overhead(overhead, 0.05 - overhead, slo)
    assert overhead == pytest.approx(0.05, abs=1e-3)
    assert learn_overhead(0.01, -1.0, slo) == 0.0  # never below zero
    assert learn_overhead(2.99, 0.3, slo) == 3.0  # nor above the SLO


def test_no_finer_chunks_when_even_the_smallest_step_breaks_the_tpot_slo() -> None:
    """The H100 fit of 2026-12-07 (8B shape): a step with any prefill costs ~50 ms below the
    2048-token knee, the TPOT SLO is 40 ms. Cutting a 3765-token prompt beside 3 running
    sequences into 16-token chunks keeps no gap within the SLO and took 239 steps (a 12 s
    TTFT); chunks whose step is no longer than the smallest one's are tried instead."""
    gpu = Coefficients(0.0062, 3.2e-5, 0.0, 4.8e-8, per_prefill_step=0.0439,
                       prefill_free_tokens=2048.0)
    slo = Slo(1.0, 0.040)
    view = decode(running=3, context=3 * 3000, model=gpu)
    p = predict_local(3765, view, TRANSFER, slo)
    assert p.chunk == 0 or p.chunk >= 2048, p  # the knee's worth per step, not 16
    assert p.ttft_s < 0.5
    assert p.ttft_s < prefill_seconds(gpu, 3765, 16, 3, 9000) / 10
    # on a CPU fit (linear from the first token) a step over the SLO still rules a chunk out
    cpu = predict_local(3765, decode(running=3, context=9000), TRANSFER, Slo(30.0, 0.05))
    assert cpu.chunk == 16
