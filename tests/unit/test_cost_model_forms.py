"""The step-time model fits both shapes of step time: GPU-like (flat until compute-bound, a
fixed extra cost for a step with prefill) and CPU-like (linear from the first token), from
noisy steps with outliers; and the placement rule's chunked prefill uses the same form."""

from __future__ import annotations

import random

import pytest

from proxy.cost_model import Coefficients, StepCostModel
from proxy.placement import DecodeView, Slo, TransferView, predict_local, prefill_seconds

# An H100-like worker (Llama-3-8B shape, measured: decode ~6 ms for any batch up to a dozen
# sequences, any prefill step >= ~22 ms, a 1500-token prefill ~37 ms).
GPU = Coefficients(per_step=6e-3, per_prefill_token=2.5e-5, per_decode_seq=5e-5,
                   per_context_token=1e-8, per_prefill_step=16e-3, prefill_free_tokens=768)
CPU = Coefficients(0.015, 1.8e-3, 4e-4, 3e-6)


def _steps(rng: random.Random, n: int, coef: Coefficients, noise: float = 0.03,
           outliers: float = 0.05) -> list[tuple[float, int, int, int]]:
    out = []
    for _ in range(n):
        prefill = rng.choice([0] * 6 + [8, 32, 96, 200, 400, 800, 1200, 1500, 2048])
        decode = rng.randint(0 if prefill else 1, 16)
        context = decode * rng.randint(50, 1500) + prefill
        t = coef.step_seconds(prefill, decode, context) * (1 + rng.gauss(0, noise))
        if rng.random() < outliers:
            t *= rng.uniform(3, 20)  # a stalled step (GC, page fault, another tenant)
        out.append((t, prefill, decode, context))
    return out


def _fitted(coef: Coefficients, seed: int = 1, n: int = 500) -> StepCostModel:
    model = StepCostModel()
    for step in _steps(random.Random(seed), n, coef):
        model.observe(*step)
    return model


def _rel(got: float, want: float) -> float:
    return abs(got - want) / want


@pytest.mark.parametrize("mix", [(0, 1, 500), (0, 16, 20000), (8, 4, 3000), (400, 8, 6000),
                                 (768, 2, 2000), (1500, 4, 5000), (2048, 12, 12000)])
def test_gpu_like_steps_are_predicted_within_10_percent(mix: tuple[int, int, int]) -> None:
    model = _fitted(GPU)
    assert _rel(model.predict(*mix), GPU.step_seconds(*mix)) < 0.10, model.coefficients


def test_gpu_like_fit_recovers_floor_knee_and_slope() -> None:
    got = _fitted(GPU).coefficients
    assert _rel(got.per_step, GPU.per_step) < 0.1, got
    assert _rel(got.per_prefill_step, GPU.per_prefill_step) < 0.15, got
    assert 512 <= got.prefill_free_tokens <= 1024, got
    # the slope past the knee, as the time it adds to a 2048-token step
    added = got.prefill_step_seconds(2048) - got.prefill_step_seconds(8)
    assert _rel(added, GPU.prefill_step_seconds(2048) - GPU.prefill_step_seconds(8)) < 0.2, got


def test_a_gpu_like_prefill_worker_finds_its_knee_from_prefill_steps_alone() -> None:
    rng = random.Random(6)
    model = StepCostModel()
    for _ in range(300):
        tokens = rng.choice([16, 64, 200, 400, 800, 1200, 1600, 2048])
        model.observe(GPU.step_seconds(tokens, 0, tokens) * (1 + rng.gauss(0, 0.03)), tokens, 0,
                      tokens)
    got = model.coefficients
    assert 512 <= got.prefill_free_tokens <= 1024, got
    for tokens in (16, 400, 1500, 2048):
        want = GPU.step_seconds(tokens, 0, tokens)
        assert _rel(model.predict(tokens, 0, tokens), want) < 0.1, (tokens, got)


def test_cpu_like_steps_keep_the_plain_linear_form() -> None:
    model = _fitted(CPU, seed=2)
    got = model.coefficients
    assert (got.prefill_free_tokens, got.per_prefill_step, got.per_decode_only_step) == (0, 0, 0)
    assert _rel(got.per_prefill_token, CPU.per_prefill_token) < 0.05, got
    for mix in [(0, 1, 500), (8, 4, 3000), (256, 8, 4000), (2048, 12, 12000)]:
        assert _rel(model.predict(*mix), CPU.step_seconds(*mix)) < 0.05, (mix, got)


def test_a_prefill_step_may_cost_less_fixed_time_than_a_decode_step() -> None:
    """Two intercepts, each >= 0: a decode step's fixed cost above a prefill step's is fitted
    as `per_decode_only_step`, not forced into a negative `per_prefill_step`."""
    truth = Coefficients(per_step=0.004, per_prefill_token=1e-3, per_decode_seq=1e-3,
                         per_decode_only_step=0.016)
    model = _fitted(truth, seed=5)
    got = model.coefficients
    assert got.per_prefill_step == 0 and _rel(got.per_decode_only_step, 0.016) < 0.15, got
    for mix in [(16, 0, 16), (16, 2, 500), (0, 1, 128), (0, 8, 4000)]:
        assert _rel(model.predict(*mix), truth.step_seconds(*mix)) < 0.1, (mix, got)


def test_a_worker_that_moves_from_cpu_like_to_gpu_like_is_followed() -> None:
    """Recency weights and the periodic knee search let the form change, not only the scale."""
    model = _fitted(CPU, seed=3, n=300)
    for step in _steps(random.Random(4), 700, GPU):
        model.observe(*step)
    for mix in [(0, 8, 4000), (200, 4, 3000), (1500, 4, 5000)]:
        assert _rel(model.predict(*mix), GPU.step_seconds(*mix)) < 0.1, model.coefficients


def test_the_form_is_flat_up_to_the_knee_then_linear() -> None:
    c = Coefficients(per_step=0.006, per_prefill_token=1e-5, per_prefill_step=0.016,
                     prefill_free_tokens=1000)
    assert c.step_seconds(0, 4, 0) == pytest.approx(0.006)
    assert c.step_seconds(1, 4, 0) == c.step_seconds(1000, 4, 0) == pytest.approx(0.022)
    assert c.step_seconds(3000, 4, 0) == pytest.approx(0.022 + 2000 * 1e-5)


def test_chunked_prefill_pays_the_floor_per_chunk_and_the_last_chunk_its_own_tokens() -> None:
    c = Coefficients(per_step=0.006, per_prefill_token=1e-5, per_prefill_step=0.016,
                     prefill_free_tokens=1000)
    # 2500 tokens in chunks of 2000: one full chunk, one of 500 (under the knee: flat)
    want = c.step_seconds(2000, 0, 1250) + c.step_seconds(500, 0, 1250)
    assert prefill_seconds(c, 2500, 2000) == pytest.approx(want)
    linear = Coefficients(0.02, 2e-3, 1e-3, 2e-6)  # linear: the last chunk's unused tokens are
    got = prefill_seconds(linear, 2500, 1024)  # not paid
    assert got == pytest.approx(3 * linear.step_seconds(1024, 0, 1250) - 572 * 2e-3)


def test_new_terms_validate_and_form_every_is_checked() -> None:
    with pytest.raises(ValueError, match="prefill_free_tokens"):
        Coefficients(prefill_free_tokens=-1.0)
    with pytest.raises(ValueError, match="seconds_per_prefill_step"):
        Coefficients(per_prefill_step=float("nan"))
    with pytest.raises(ValueError, match="form_every"):
        StepCostModel(form_every=0)


def test_local_prefill_on_a_gpu_like_worker_takes_chunks_up_to_the_knee() -> None:
    """Below the knee a chunk costs a decode batch no more than a smaller one does, so the
    placement rule takes large chunks (few steps at ~the floor), not many small ones."""
    decode = DecodeView("decode-0", GPU, num_running=8, context_tokens=8 * 600,
                        local_queue_s=0.0, local_chunk=0, cached_tokens=0,
                        max_batched_tokens=4096)
    transfer = TransferView(kv_bytes_per_token=131072, bytes_per_second=1e10,
                            remote_overhead_s=0.01, local_overhead_s=0.001)
    got = predict_local(2000, decode, transfer, Slo(ttft_s=1.0, tpot_s=0.04))
    assert got.chunk >= GPU.prefill_free_tokens, got
    assert got.ttft_s < 0.1 and got.tpot_s < 0.04, got


def test_form_searches_are_spaced_in_time_on_the_proxys_event_loop() -> None:
    """A GPU worker reports ~150 steps a second: searches (~70 ms each) wait `form_interval_s`
    as well as `form_every` steps."""
    now = [0.0]
    model = StepCostModel(form_every=8, form_interval_s=30.0, clock=lambda: now[0])
    searches = []
    search = model._search_form
    model._search_form = lambda *a: searches.append(now[0]) or search(*a)  # type: ignore
    for t, steps in ((0.0, 64), (10.0, 64), (29.0, 64), (31.0, 64), (40.0, 4)):
        now[0] = t
        for step in _steps(random.Random(int(t)), steps, GPU):
            model.observe(*step)
        model.coefficients  # noqa: B018 (the refit runs on access)
    assert searches == [0.0, 31.0]
