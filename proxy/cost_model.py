"""Step-time cost model of one worker, fitted online from the steps it reports.

    step seconds = a + b * decode sequences + c * context tokens
                   + (if the step holds prefill tokens P) e + f * max(0, P - k)
                   + (if it holds none) g

- `a` is what every step costs (on a GPU: reading the weights once, ~6 ms for 8B in bf16);
- `e` what a step with prefill costs beyond that (a different attention path, more launches),
  `g` what a step without costs beyond that: a split form fits one intercept for steps with
  prefill and one for steps without, each >= 0, and `a` is the smaller (so `e` or `g` is 0);
  the plain form has one intercept (e = g = 0);
- `k` prefill tokens a step carries at no extra cost: a GPU is memory-bound until a step holds
  enough tokens to be compute-bound, so its step time is flat in P up to the knee `k` and
  linear after it (a roofline). On a CPU, `k` = 0: linear from the first token.
With e = g = k = 0 it is the linear model a + b*P + c*D + d*C.
`StepCostModel.observe(...)` takes one measured step (what the step held and how long it took);
`predict(...)` evaluates the current fit. The fit is a robust, recency-weighted least squares
in relative error over the last `window` steps (robust_fit.py), redone lazily when new steps
came in:
- two windows: steps that hold prefill tokens and steps that do not are kept apart, `window`
  of each, so a long run of decode-only steps (a GPU worker makes ~150 a second while its
  sequences decode, one prefill step per arriving prompt) never pushes every prefill step out
  of the fit: with one shared window of 512, at a low request rate the window held fewer prefill
  steps than a fit needs, the prefill terms fell back to the prior (a CPU's 2 ms per token), and
  the placer cut a GPU's local prompts into 32-token chunks (2-4 s TTFTs at 0.5 req/s on an
  H100, 2026-12-06);
- recency: within each window, step i of n weighs `decay ** (n - 1 - i)`, so the fit follows a
  worker whose speed changes (another tenant, thermal limits) within a few hundred steps of
  each kind;
- robustness: Huber weights on the relative residuals (beyond `huber_k` robust standard
  deviations they count linearly), so a step stalled by a garbage collection, a page fault or
  another tenant bends the fit by a bounded amount (`huber_k` 1 by default: step times on a
  shared host are heavy-tailed, and the proxy wants the typical step);
- sense: coefficients are never negative; a term the samples cannot identify (a prefill worker
  never runs decode sequences) keeps its prior;
- the form: the plain linear form, the split intercepts, and the split form with each knee in
  `KNEES` below the largest prefills the window holds are fitted; each step up in complexity
  is kept only if it lowers the robust loss by `FORM_GAIN` (so linear or noisy data keeps the
  linear form).
  The form is chosen again every `form_every` new steps (candidates with one reweighting, not
  three); refits in between keep it, so an online refit costs one robust fit, as a linear
  model's would.

The prior (`seed`) is what the model predicts before any sample arrives; workers report a short
warm-up at start-up, so it is rarely used for long. Pure Python: the proxy imports no numpy.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from proxy.robust_fit import MIN_SUPPORT, RobustFit, robust_fit

TERM_NAMES = ("seconds_per_step", "seconds_per_prefill_token", "seconds_per_decode_seq",
              "seconds_per_context_token", "seconds_per_prefill_step", "prefill_free_tokens",
              "seconds_per_decode_only_step")
# Columns of the fit: step without prefill, step with prefill, prefill tokens past the knee,
# decode seqs, context; scaled to similar magnitudes before solving (per 1, 1, 1k, 10, 10k).
_SCALE = (1.0, 1.0, 1e-3, 1e-1, 1e-4)
KNEES = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096)
FORM_GAIN = 0.05  # each step up in form must lower the robust loss by 5 %


@dataclass(frozen=True)
class Coefficients:
    """Seconds per step, per prefill token (past `prefill_free_tokens`), per decode sequence,
    per context token, and added to `per_step` for a step that holds prefill tokens
    (`per_prefill_step`) or for one that holds none (`per_decode_only_step`)."""

    per_step: float = 0.0
    per_prefill_token: float = 0.0
    per_decode_seq: float = 0.0
    per_context_token: float = 0.0
    per_prefill_step: float = 0.0
    prefill_free_tokens: float = 0.0
    per_decode_only_step: float = 0.0

    def __post_init__(self) -> None:
        for name, value in zip(TERM_NAMES, self.as_tuple(), strict=True):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"cost model {name} must be finite and >= 0, got {value}")

    def as_tuple(self) -> tuple[float, float, float, float, float, float, float]:
        return (self.per_step, self.per_prefill_token, self.per_decode_seq,
                self.per_context_token, self.per_prefill_step, self.prefill_free_tokens,
                self.per_decode_only_step)

    def prefill_step_seconds(self, prefill_tokens: float) -> float:
        """What a step holding `prefill_tokens` (> 0) costs beyond `per_step` and its decodes."""
        return self.per_prefill_step + self.per_prefill_token * max(
            0.0, prefill_tokens - self.prefill_free_tokens)

    def step_seconds(self, prefill_tokens: float, decode_seqs: float,
                     context_tokens: float) -> float:
        own = (self.prefill_step_seconds(prefill_tokens) if prefill_tokens > 0
               else self.per_decode_only_step)
        return (self.per_step + own + self.per_decode_seq * decode_seqs
                + self.per_context_token * context_tokens)


# A CPU-sized guess (SmolLM2 on one core), replaced as soon as a worker reports its warm-up.
DEFAULT_PRIOR = Coefficients(0.02, 2e-3, 1e-3, 2e-6)


class StepCostModel:
    def __init__(self, seed: Coefficients = DEFAULT_PRIOR, *, window: int = 512,
                 decay: float = 0.995, huber_k: float = 1.0, ridge: float = 1e-3,
                 form_every: int = 128, form_interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`form_every` steps and `form_interval_s` seconds at least between two searches of
        the model's form (~70 ms each, on the proxy's event loop: a GPU worker reports ~150
        steps a second, so the step count alone would search every second per worker)."""
        if (window < 8 or not 0.0 < decay <= 1.0 or huber_k <= 0 or ridge < 0
                or form_every < 1 or form_interval_s < 0):
            raise ValueError("window >= 8, 0 < decay <= 1, huber_k > 0, ridge >= 0, "
                             "form_every >= 1 and form_interval_s >= 0 required")
        self.form_interval_s, self._clock = form_interval_s, clock
        self._searched_at = -math.inf
        self.prior = seed
        self.decay, self.huber_k, self.ridge, self.form_every = decay, huber_k, ridge, form_every
        # steps without prefill tokens, and steps with (see "two windows" above)
        self._decode_only: deque[tuple[float, int, int, int]] = deque(maxlen=window)
        self._with_prefill: deque[tuple[float, int, int, int]] = deque(maxlen=window)
        self._fit = seed
        self._form = _Form(seed.prefill_free_tokens, split=True)
        self._since_form_search = form_every  # search on the first refit
        self._is_stale = False
        self.num_observed = 0

    def observe(self, seconds: float, prefill_tokens: int, decode_seqs: int,
                context_tokens: int) -> None:
        """One measured step. Values that cannot be a step (negative, not finite, a step of no
        time or holding nothing) are ignored: the fit is in relative error."""
        values = (seconds, prefill_tokens, decode_seqs, context_tokens)
        if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values):
            return
        if (prefill_tokens == 0 and decode_seqs == 0) or seconds == 0:
            return  # an empty step says nothing about the model
        (self._with_prefill if prefill_tokens else self._decode_only).append(
            (float(seconds), int(prefill_tokens), int(decode_seqs), int(context_tokens)))
        self.num_observed += 1
        self._since_form_search += 1
        self._is_stale = True

    @property
    def coefficients(self) -> Coefficients:
        if self._is_stale:
            self._fit = self._refit()
            self._is_stale = False
        return self._fit

    def predict(self, prefill_tokens: float, decode_seqs: float, context_tokens: float) -> float:
        return self.coefficients.step_seconds(prefill_tokens, decode_seqs, context_tokens)

    # ---- fitting ------------------------------------------------------------------------------
    def _window(self) -> tuple[list[tuple[float, int, int, int]], list[float]]:
        """The steps a fit reads (both windows) and each one's recency weight within its own
        window, in the same order."""
        samples = [*self._decode_only, *self._with_prefill]
        recency = [self.decay ** (len(w) - 1 - i) for w in (self._decode_only, self._with_prefill)
                   for i in range(len(w))]
        return samples, recency

    def _refit(self) -> Coefficients:
        samples, recency = self._window()
        if len(samples) < 2:
            return self.prior
        ys = [s[0] for s in samples]
        now = self._clock()
        if (self._since_form_search >= self.form_every
                and now - self._searched_at >= self.form_interval_s):
            self._since_form_search, self._searched_at = 0, now
            self._form = self._search_form(samples, ys, recency)
        return self._coefficients(self._fit_at(self._form, samples, ys, recency), self._form)

    def _search_form(self, samples: list[tuple[float, int, int, int]], ys: list[float],
                     recency: list[float]) -> _Form:
        """The simplest form that fits: the plain one, else split intercepts, then with a knee,
        each step kept only if it lowers the robust loss by `FORM_GAIN`. Losses are compared in
        the smallest residual scale of the candidates (the noise, not a poor form's misfit).
        A worker that only prefills (a prefill worker) has no plain form to try."""
        prefills = sorted(p for _, p, _, _ in self._with_prefill)
        if len(prefills) < MIN_SUPPORT:
            return _Form(self.prior.prefill_free_tokens, split=True)  # prefill terms: prior
        both_kinds = len(prefills) <= len(ys) - MIN_SUPPORT
        forms = [_Form(0.0, split=False)] if both_kinds else []
        forms.append(_Form(0.0, split=True))
        # a knee needs prefill steps past it to fit the slope after it
        forms += [_Form(float(k), split=True) for k in KNEES if k < prefills[-MIN_SUPPORT]]
        fits = [self._fit_at(f, samples, ys, recency, iterations=1) for f in forms]
        scale = min(fit.scale for fit in fits)
        losses = [fit.loss(recency, scale, self.huber_k) for fit in fits]
        base = 1 if both_kinds else 0  # the split form without a knee
        if both_kinds and losses[1] >= (1 - FORM_GAIN) * losses[0]:
            return forms[0]
        best = min(range(base, len(forms)), key=lambda i: losses[i])
        return forms[best] if losses[best] < (1 - FORM_GAIN) * losses[base] else forms[base]

    def _fit_at(self, form: _Form, samples: list[tuple[float, int, int, int]], ys: list[float],
                recency: list[float], iterations: int = 3) -> RobustFit:
        rows = [_features(p, d, c, form) for _, p, d, c in samples]
        p = self.prior
        prior = [v / s for v, s in zip((p.per_step + p.per_decode_only_step,
                                        p.per_step + p.per_prefill_step,
                                        p.per_prefill_token, p.per_decode_seq,
                                        p.per_context_token), _SCALE, strict=True)]
        return robust_fit(rows, ys, recency, prior, self.ridge, self.huber_k, iterations)

    @staticmethod
    def _coefficients(fit: RobustFit, form: _Form) -> Coefficients:
        step, prefill_step, token, seq, context = (max(0.0, t * s) for t, s in
                                                   zip(fit.theta, _SCALE, strict=True))
        if not form.split:
            return Coefficients(step, token, seq, context, 0.0, form.knee)
        common = min(step, prefill_step)
        return Coefficients(common, token, seq, context, prefill_step - common, form.knee,
                            step - common)


@dataclass(frozen=True)
class _Form:
    """Which model form a fit uses: the knee, and one intercept or two (with/without prefill)."""

    knee: float
    split: bool


def _features(prefill_tokens: int, decode_seqs: int, context_tokens: int,
              form: _Form) -> tuple[float, float, float, float, float]:
    """Fit columns (see _SCALE); with one intercept its second column is all zero, so the
    fit holds it at its prior and `_coefficients` ignores it."""
    has_prefill = 1.0 if prefill_tokens and form.split else 0.0
    past_knee = max(0.0, prefill_tokens - form.knee) if prefill_tokens else 0.0
    return (1.0 - has_prefill, has_prefill, past_knee * _SCALE[2], decode_seqs * _SCALE[3],
            context_tokens * _SCALE[4])
