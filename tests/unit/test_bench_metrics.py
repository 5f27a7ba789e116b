"""bench/metrics.py on hand-made timings: SLO attainment, goodput, percentiles, consistency."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.metrics import RequestResult, Slo, Stats, check_request, goodput_from_curve, summarize


def done(i: int, ttft: float, e2e: float, tokens: int, chunks: int | None = None,
         prompt: int = 10) -> RequestResult:
    """A successful request whose text chunks are evenly spaced between TTFT and e2e."""
    chunks = tokens if chunks is None else chunks
    gap = (e2e - ttft) / (chunks - 1) if chunks > 1 else 0.0
    return RequestResult(i, ttft_s=ttft, e2e_s=e2e, itl_s=[gap] * (chunks - 1), num_chunks=chunks,
                         prompt_tokens=prompt, completion_tokens=tokens)


SLO = Slo(ttft_s=0.5, tpot_s=0.125)
# index: ttft, e2e, tokens -> tpot; meets? (binary-exact values, so the boundaries are exact)
HAND_MADE = [
    done(0, 0.25, 1.25, 9),  # tpot 0.125 (= SLO): meets
    done(1, 0.6, 1.0, 5),  # ttft 0.6 > 0.5: misses
    done(2, 0.125, 2.125, 9),  # tpot 0.25: misses
    done(3, 0.3, 0.3, 1),  # one token, no TPOT: meets
    RequestResult(4, error="http_503", error_detail="queue full"),  # failed: misses
    done(5, 0.5, 1.5, 17),  # ttft = SLO, tpot 0.0625: meets
]


def test_tpot_is_decode_time_per_token_after_the_first() -> None:
    assert HAND_MADE[0].tpot_s == 0.125
    assert HAND_MADE[2].tpot_s == 0.25
    assert HAND_MADE[3].tpot_s is None
    assert HAND_MADE[4].tpot_s is None


def test_slo_met_iff_ttft_and_tpot_within_targets() -> None:
    assert [SLO.met(r) for r in HAND_MADE] == [True, False, False, True, False, True]


def test_attainment_and_goodput_of_a_run() -> None:
    s = summarize(HAND_MADE, duration_s=10.0, slo=SLO)
    assert (s.num_requests, s.num_ok, s.num_slo_met) == (6, 5, 3)
    assert s.attainment == pytest.approx(0.5)  # failures count in the denominator
    assert s.goodput == pytest.approx(0.3)  # 3 SLO-meeting requests in 10 s
    assert s.request_throughput == pytest.approx(0.5)
    assert s.output_tokens == 9 + 5 + 9 + 1 + 17
    assert s.output_token_throughput == pytest.approx(4.1)
    assert s.total_token_throughput == pytest.approx((41 + 50) / 10)
    assert s.errors == {"http_503": 1}
    assert s.checks == {}


def test_latency_stats_over_successful_requests() -> None:
    s = summarize(HAND_MADE, duration_s=10.0, slo=SLO)
    assert s.ttft is not None and s.e2e is not None and s.tpot is not None and s.itl is not None
    assert s.ttft.n == 5 and s.ttft.mean == pytest.approx((0.25 + 0.6 + 0.125 + 0.3 + 0.5) / 5)
    assert s.ttft.median == pytest.approx(0.3)
    assert s.tpot.n == 4  # the one-token request has no TPOT
    assert s.itl.n == 8 + 4 + 8 + 0 + 16
    assert s.e2e.max == 2.125
    assert s.tpot.max == 0.25


def test_percentiles_interpolate_like_numpy() -> None:
    st_ = Stats.of([4.0, 1.0, 3.0, 2.0])
    assert st_ == Stats(n=4, mean=2.5, median=2.5, p90=pytest.approx(3.7), p99=pytest.approx(3.97),
                        min=1.0, max=4.0)
    assert Stats.of([]) is None
    one = Stats.of([0.25])
    assert one is not None and one.p99 == one.median == one.mean == 0.25


def test_empty_run_summarizes_without_dividing_by_zero() -> None:
    s = summarize([], duration_s=0.0, slo=SLO)
    assert s.attainment == 0.0 and s.goodput == 0.0 and s.ttft is None


def test_consistency_checks_catch_impossible_timings_and_counts() -> None:
    assert check_request(HAND_MADE[0]) == []
    late = done(0, 1.0, 0.5, 3)
    assert "ttft_not_within_e2e" in check_request(late)
    extra_chunks = done(0, 0.1, 0.5, 3, chunks=5)  # 5 text chunks cannot hold 3 tokens
    assert "more_chunks_than_tokens" in check_request(extra_chunks)
    multi = done(0, 0.1, 0.5, 6, chunks=3)  # several tokens per chunk is fine
    assert check_request(multi) == []
    no_usage = done(0, 0.1, 0.5, 3)
    no_usage.completion_tokens = None
    assert check_request(no_usage) == ["no_usage"]
    assert no_usage.output_tokens == 3  # falls back to the chunk count
    short = done(0, 0.1, 0.5, 3)
    short.expected_output_tokens = 4
    assert check_request(short) == ["output_len_not_max_tokens"]
    assert check_request(RequestResult(0, error="timeout")) == []


def test_goodput_is_the_highest_rate_before_the_curve_drops_below_target() -> None:
    g = goodput_from_curve([(1.0, 0.99), (2.0, 0.95), (4.0, 0.5), (3.0, 0.90)])
    assert (g.rate, g.first_miss) == (3.0, 4.0)  # 0.90 at 3 req/s meets ">= 90%"
    noisy = goodput_from_curve([(1.0, 0.95), (2.0, 0.85), (3.0, 0.95)])
    assert (noisy.rate, noisy.first_miss) == (1.0, 2.0)  # a pass above a miss does not count
    assert goodput_from_curve([(0.5, 0.2), (1.0, 0.0)]) == goodput_from_curve([(0.5, 0.2)])
    assert goodput_from_curve([(0.5, 0.2)]).rate is None
    assert goodput_from_curve([(1.0, 1.0), (math.inf, 0.95)]).rate == math.inf
    assert goodput_from_curve([(1.0, 0.8)], target=0.75).rate == 1.0


@given(st.lists(st.tuples(st.floats(0.01, 100), st.floats(0, 1)), max_size=12), st.floats(0.05, 1))
def test_goodput_rates_below_it_all_meet_the_target(points: list[tuple[float, float]],
                                                    target: float) -> None:
    g = goodput_from_curve(points, target)
    if g.rate is not None:
        assert all(a >= target for r, a in points if r <= g.rate)
    if g.first_miss is not None:
        assert any(r == g.first_miss and a < target for r, a in points)
        assert g.rate is None or g.rate < g.first_miss


def test_slo_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Slo(0.0, 0.1)
    with pytest.raises(ValueError):
        Slo(1.0, 0.1, attainment=1.5)
