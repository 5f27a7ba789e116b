"""The online step-time fit recovers known coefficients from noisy steps with outliers, follows a
worker whose speed changes, keeps unidentifiable terms at the prior and never goes negative."""

from __future__ import annotations

import random

import pytest

from proxy.cost_model import Coefficients, StepCostModel

TRUE = Coefficients(0.015, 1.8e-3, 4e-4, 3e-6)


def _steps(rng: random.Random, n: int, coef: Coefficients, noise: float = 0.05,
           outliers: float = 0.0) -> list[tuple[float, int, int, int]]:
    out = []
    for _ in range(n):
        prefill = rng.choice([0, 0, 16, 64, 128, 256, 512])
        decode = rng.randint(0 if prefill else 1, 24)
        context = decode * rng.randint(50, 1500)
        t = coef.step_seconds(prefill, decode, context) * (1 + rng.gauss(0, noise))
        if rng.random() < outliers:
            t *= rng.uniform(5, 30)  # a stalled step (GC, page fault, another tenant)
        out.append((max(t, 0.0), prefill, decode, context))
    return out


def _close(got: float, want: float, rel: float) -> bool:
    return abs(got - want) <= rel * want


def test_recovers_known_coefficients_despite_noise_and_outliers() -> None:
    model = StepCostModel()
    for step in _steps(random.Random(1), 400, TRUE, noise=0.05, outliers=0.08):
        model.observe(*step)
    got = model.coefficients
    assert _close(got.per_prefill_token, TRUE.per_prefill_token, 0.05), got
    assert _close(got.per_context_token, TRUE.per_context_token, 0.25), got
    assert _close(got.per_step, TRUE.per_step, 0.3), got
    assert _close(model.predict(256, 8, 4000), TRUE.step_seconds(256, 8, 4000), 0.05)


def test_plain_least_squares_would_not_survive_those_outliers() -> None:
    """The robust weights matter: with them off (huge huber_k) the same data bends the fit."""
    steps = _steps(random.Random(1), 400, TRUE, noise=0.05, outliers=0.08)
    robust, plain = StepCostModel(), StepCostModel(huber_k=1e9)
    for step in steps:
        robust.observe(*step)
        plain.observe(*step)
    want = TRUE.step_seconds(64, 8, 4000)
    assert abs(robust.predict(64, 8, 4000) - want) < 0.1 * want
    assert abs(plain.predict(64, 8, 4000) - want) > 0.3 * want


def test_follows_a_worker_that_slows_down() -> None:
    model = StepCostModel()
    rng = random.Random(2)
    for step in _steps(rng, 300, TRUE):
        model.observe(*step)
    slower = Coefficients(*(2 * c for c in TRUE.as_tuple()))
    for step in _steps(rng, 600, slower):
        model.observe(*step)
    assert _close(model.predict(128, 4, 2000), slower.step_seconds(128, 4, 2000), 0.1)


def test_terms_the_samples_cannot_tell_apart_stay_at_the_prior() -> None:
    """A prefill worker never runs decode sequences: that term keeps its prior."""
    prior = Coefficients(0.01, 1e-3, 7e-4, 1e-6)
    model = StepCostModel(prior)
    for n in (16, 64, 128, 256, 512) * 10:
        model.observe(0.01 + 2e-3 * n, n, 0, 0)
    got = model.coefficients
    assert _close(got.per_prefill_token, 2e-3, 0.02)
    assert _close(got.per_decode_seq, prior.per_decode_seq, 0.05)


def test_before_any_sample_it_predicts_the_prior_and_ignores_garbage() -> None:
    model = StepCostModel(TRUE)
    for bad in [(-1.0, 10, 1, 10), (float("nan"), 10, 1, 10), (0.1, -5, 1, 10),
                (float("inf"), 1, 1, 1), (0.2, 0, 0, 0)]:
        model.observe(*bad)
    assert model.num_observed == 0
    assert model.coefficients == TRUE


def test_coefficients_never_negative() -> None:
    model = StepCostModel()
    rng = random.Random(3)
    for _ in range(200):  # step time falls with context: a nonsense relation
        context = rng.randint(0, 10000)
        model.observe(max(0.001, 0.05 - 4e-6 * context), 0, 4, context)
    assert all(c >= 0 for c in model.coefficients.as_tuple())


@pytest.mark.parametrize("kwargs", [{"window": 2}, {"decay": 0.0}, {"huber_k": 0.0},
                                    {"ridge": -1.0}])
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        StepCostModel(**kwargs)


def test_coefficients_validate() -> None:
    with pytest.raises(ValueError, match="seconds_per_prefill_token"):
        Coefficients(0.0, -1.0, 0.0, 0.0)


def test_decode_only_steps_do_not_push_out_what_prefill_steps_taught() -> None:
    """A GPU worker at a low request rate: ~150 decode-only steps per prompt and one prefill
    step. With one shared window of 512 steps, the window soon held fewer prefill steps than a
    fit needs, the prefill terms fell back to the prior (a CPU's 2 ms per token) and a 512-token
    chunk beside two decodes was predicted at ~1 s instead of ~20 ms (an H100 sweep at 0.5 req/s
    then cut prompts into 32-token chunks: 2-4 s TTFTs). Each kind now keeps its own window."""
    true = Coefficients(per_step=0.006, per_prefill_token=25e-6, per_decode_seq=2e-5,
                        per_context_token=1e-8, per_prefill_step=0.012,
                        prefill_free_tokens=1024)
    rng = random.Random(0)

    def observe(p: int, d: int, c: int) -> None:
        model.observe(true.step_seconds(p, d, c) * (1 + rng.gauss(0, 0.03)), p, d, c)

    model = StepCostModel()
    for p in (16, 64, 256, 1024):  # the worker's warm-up
        observe(p, 0, p)
    for i in range(4):
        observe(64, 3, 100 + 64 * i)
    for _ in range(12):  # prompts one at a time, each decoding alone for 64-256 tokens
        prompt = rng.randint(2048, 7800)
        observe(prompt, 0, prompt)
        for k in range(rng.randint(64, 256)):
            observe(0, 1, prompt + k)
    for chunk in (32, 512):
        want = true.step_seconds(chunk, 2, 4000)
        assert abs(model.predict(chunk, 2, 4000) - want) < 0.6 * want, (chunk, model.coefficients)
    want = true.step_seconds(0, 1, 4000)
    assert abs(model.predict(0, 1, 4000) - want) < 0.1 * want
