"""Step-time cost model of one worker, fitted online from the steps it reports.

    step seconds = a + b * prefill tokens + c * decode sequences + d * context tokens

`StepCostModel.observe(...)` takes one measured step (what the step held and how long it took);
`predict(...)` evaluates the current fit. The fit is a robust, recency-weighted least squares
over the last `window` steps, redone lazily when new steps came in:
- recency: step i of n weighs `decay ** (n - 1 - i)`, so the fit follows a worker whose speed
  changes (another tenant, thermal limits) within a few hundred steps;
- robustness: iteratively reweighted least squares with Huber weights (residuals beyond
  `huber_k` robust standard deviations, estimated from the median absolute residual, count
  linearly, not squared), so a step stalled by a garbage collection or a page fault bends the
  fit by a bounded amount;
- sense: coefficients are never negative (a term whose fitted cost is negative is dropped and
  the rest refitted); a small ridge pull toward the prior keeps terms the samples cannot tell
  apart (a prefill worker never runs decode sequences) at their prior.

The prior (`seed`) is what the model predicts before any sample arrives; workers report a short
warm-up at start-up, so it is rarely used for long. Pure Python: the proxy imports no numpy.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

NUM_TERMS = 4  # intercept, prefill tokens, decode sequences, context tokens
TERM_NAMES = ("seconds_per_step", "seconds_per_prefill_token", "seconds_per_decode_seq",
              "seconds_per_context_token")
# Features are scaled to similar magnitudes before solving (per 1, 1k, 10, 10k).
_SCALE = (1.0, 1e-3, 1e-1, 1e-4)


@dataclass(frozen=True)
class Coefficients:
    """Seconds per step, per prefill token, per decode sequence and per context token."""

    per_step: float = 0.0
    per_prefill_token: float = 0.0
    per_decode_seq: float = 0.0
    per_context_token: float = 0.0

    def __post_init__(self) -> None:
        for name, value in zip(TERM_NAMES, self.as_tuple(), strict=True):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"cost model {name} must be finite and >= 0, got {value}")

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.per_step, self.per_prefill_token, self.per_decode_seq,
                self.per_context_token)

    def step_seconds(self, prefill_tokens: float, decode_seqs: float,
                     context_tokens: float) -> float:
        return (self.per_step + self.per_prefill_token * prefill_tokens
                + self.per_decode_seq * decode_seqs + self.per_context_token * context_tokens)


# A CPU-sized guess (SmolLM2 on one core), replaced as soon as a worker reports its warm-up.
DEFAULT_PRIOR = Coefficients(0.02, 2e-3, 1e-3, 2e-6)


class StepCostModel:
    def __init__(self, seed: Coefficients = DEFAULT_PRIOR, *, window: int = 512,
                 decay: float = 0.995, huber_k: float = 2.0, ridge: float = 1e-3) -> None:
        if window < 8 or not 0.0 < decay <= 1.0 or huber_k <= 0 or ridge < 0:
            raise ValueError("window >= 8, 0 < decay <= 1, huber_k > 0 and ridge >= 0 required")
        self.prior = seed
        self.decay, self.huber_k, self.ridge = decay, huber_k, ridge
        self._samples: deque[tuple[float, float, float, float, float]] = deque(maxlen=window)
        self._fit = seed
        self._is_stale = False
        self.num_observed = 0

    def observe(self, seconds: float, prefill_tokens: int, decode_seqs: int,
                context_tokens: int) -> None:
        """One measured step. Values that cannot be a step (negative, not finite) are ignored."""
        values = (seconds, prefill_tokens, decode_seqs, context_tokens)
        if not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in values):
            return
        if prefill_tokens == 0 and decode_seqs == 0:
            return  # an empty step says nothing about the model
        self._samples.append((1.0, float(prefill_tokens), float(decode_seqs),
                              float(context_tokens), float(seconds)))
        self.num_observed += 1
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
    def _refit(self) -> Coefficients:
        rows = [tuple(x * s for x, s in zip(r[:NUM_TERMS], _SCALE, strict=True))
                for r in self._samples]
        ys = [r[NUM_TERMS] for r in self._samples]
        if len(rows) < 2:
            return self.prior
        n = len(rows)
        recency = [self.decay ** (n - 1 - i) for i in range(n)]
        prior = [p / s for p, s in zip(self.prior.as_tuple(), _SCALE, strict=True)]
        theta = _nonneg_solve(rows, ys, recency, prior, self.ridge)
        for _ in range(3):  # IRLS: Huber weights from the current residuals
            residuals = [y - _dot(r, theta) for r, y in zip(rows, ys, strict=True)]
            scale = 1.4826 * _median([abs(e) for e in residuals]) or 1e-9
            limit = self.huber_k * scale
            weights = [w * min(1.0, limit / abs(e)) if e else w
                       for w, e in zip(recency, residuals, strict=True)]
            theta = _nonneg_solve(rows, ys, weights, prior, self.ridge)
        return Coefficients(*(max(0.0, t * s) for t, s in zip(theta, _SCALE, strict=True)))


def _dot(a: tuple[float, ...] | list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _nonneg_solve(rows: list[tuple[float, ...]], ys: list[float], weights: list[float],
                  prior: list[float], ridge: float) -> list[float]:
    """Weighted ridge least squares (pulled toward `prior`), terms with a negative fit dropped
    (held at 0) one at a time until none is negative."""
    active = list(range(NUM_TERMS))
    while True:
        theta = _ridge_solve(rows, ys, weights, prior, ridge, active)
        negative = [j for j in active if theta[j] < 0]
        if not negative:
            return theta
        active.remove(min(negative, key=lambda j: theta[j]))


def _ridge_solve(rows: list[tuple[float, ...]], ys: list[float], weights: list[float],
                 prior: list[float], ridge: float, active: list[int]) -> list[float]:
    k = len(active)
    total = sum(weights) or 1.0
    ata = [[0.0] * k for _ in range(k)]
    atb = [0.0] * k
    for r, y, w in zip(rows, ys, weights, strict=True):
        xs = [r[j] for j in active]
        for i in range(k):
            wx = w * xs[i]
            atb[i] += wx * y
            for j in range(i, k):
                ata[i][j] += wx * xs[j]
    for i in range(k):
        for j in range(i):
            ata[i][j] = ata[j][i]
        ata[i][i] += ridge * total  # ridge scaled to the data's weight
        atb[i] += ridge * total * prior[active[i]]
    solved = _gauss(ata, atb)
    theta = [0.0] * NUM_TERMS
    for i, j in enumerate(active):
        theta[j] = solved[i]
    return theta


def _gauss(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a @ x = b (small, symmetric positive definite thanks to the ridge term)."""
    k = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-300:
            continue
        for r in range(col + 1, k):
            f = m[r][col] / m[col][col]
            for c in range(col, k + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * k
    for r in range(k - 1, -1, -1):
        if abs(m[r][r]) < 1e-300:
            continue
        x[r] = (m[r][k] - sum(m[r][c] * x[c] for c in range(r + 1, k))) / m[r][r]
    return x
