"""Robust, non-negative least squares in relative error, in pure Python (the proxy imports no
numpy): the solver under the step-time cost model (cost_model.py).

`robust_fit(rows, ys, recency, prior, ridge, huber_k)` finds theta >= 0 minimizing
    sum_i recency_i * rho((y_i - rows_i . theta) / s_i)
- relative error: s_i is the measured y_i on the first pass, then the current prediction (a
  step predicted at 6 ms and one at 600 ms count alike in %, and a stalled step, far above its
  prediction, is a large residual that the Huber weights then bound);
- Huber rho: residuals beyond `huber_k` robust standard deviations (1.4826 x the median
  absolute residual, at least `MIN_SCALE`) count linearly, not squared (iteratively reweighted);
- non-negative: a term whose fit is negative is held at 0 and the rest refitted;
- prior: a column with fewer than `MIN_SUPPORT` nonzero entries cannot be told from the others,
  so it is held at its prior; the others are pulled toward the prior by `ridge` times their own
  curvature (Levenberg-Marquardt style: scale-free, and only a tie-breaker between columns
  the data cannot tell apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIN_SCALE = 0.01  # relative residuals below 1 % are noise, never outliers
MIN_SUPPORT = 3  # nonzero entries a column needs to be fitted rather than held at its prior
Row = Sequence[float]


@dataclass(frozen=True)
class RobustFit:
    theta: tuple[float, ...]
    scale: float  # robust standard deviation of the relative residuals
    residuals: tuple[float, ...]  # relative: (y - prediction) / prediction

    def loss(self, recency: Sequence[float], scale: float, huber_k: float) -> float:
        """Recency-weighted Huber loss of the residuals in units of `scale` (a common scale
        lets fits of different model forms be compared)."""
        limit = huber_k * scale
        total = 0.0
        for w, e in zip(recency, self.residuals, strict=True):
            a = abs(e)
            total += w * (a * a if a <= limit else 2 * limit * a - limit * limit)
        return total / (scale * scale)


def robust_fit(rows: Sequence[Row], ys: Sequence[float], recency: Sequence[float],
               prior: Sequence[float], ridge: float, huber_k: float,
               iterations: int = 3) -> RobustFit:
    num_terms = len(prior)
    fixed = {j: prior[j] for j in range(num_terms)
             if sum(1 for r in rows if r[j]) < MIN_SUPPORT}
    floor = 1e-3 * (_median(list(ys)) or 1.0)
    spans = [max(y, floor) for y in ys]
    weights = [w / (s * s) for w, s in zip(recency, spans, strict=True)]
    theta = nonneg_solve(rows, ys, weights, prior, ridge, fixed)
    residuals: list[float] = []
    scale = MIN_SCALE
    for i in range(iterations + 1):
        spans = [max(_dot(r, theta), floor) for r in rows]
        residuals = [(y - p) / p for y, p in zip(ys, spans, strict=True)]
        scale = max(MIN_SCALE, 1.4826 * _median([abs(e) for e in residuals]))
        if i == iterations:
            break
        limit = huber_k * scale
        weights = [w * (min(1.0, limit / abs(e)) if e else 1.0) / (p * p)
                   for w, e, p in zip(recency, residuals, spans, strict=True)]
        theta = nonneg_solve(rows, ys, weights, prior, ridge, fixed)
    return RobustFit(tuple(theta), scale, tuple(residuals))


def nonneg_solve(rows: Sequence[Row], ys: Sequence[float], weights: Sequence[float],
                 prior: Sequence[float], ridge: float, fixed: dict[int, float]) -> list[float]:
    """Weighted least squares with the `fixed` terms held, the rest pulled toward `prior`;
    terms with a negative fit are held at 0, the most negative first, until none is."""
    held = dict(fixed)
    while True:
        theta = _ridge_solve(rows, ys, weights, prior, ridge, held)
        negative = [j for j in range(len(prior)) if j not in held and theta[j] < 0]
        if not negative:
            return theta
        held[min(negative, key=lambda j: theta[j])] = 0.0


def _ridge_solve(rows: Sequence[Row], ys: Sequence[float], weights: Sequence[float],
                 prior: Sequence[float], ridge: float, held: dict[int, float]) -> list[float]:
    active = [j for j in range(len(prior)) if j not in held]
    k = len(active)
    ata = [[0.0] * k for _ in range(k)]
    atb = [0.0] * k
    for r, y, w in zip(rows, ys, weights, strict=True):
        rest = y - sum(r[j] * v for j, v in held.items())
        xs = [r[j] for j in active]
        for i in range(k):
            wx = w * xs[i]
            if not wx:
                continue
            atb[i] += wx * rest
            row = ata[i]
            for j in range(i, k):
                row[j] += wx * xs[j]
    for i in range(k):
        for j in range(i):
            ata[i][j] = ata[j][i]
        pull = ridge * ata[i][i]
        ata[i][i] += pull
        atb[i] += pull * prior[active[i]]
    solved = _gauss(ata, atb)
    theta = [held.get(j, 0.0) for j in range(len(prior))]
    for i, j in enumerate(active):
        theta[j] = solved[i]
    return theta


def _gauss(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a @ x = b (small, symmetric positive semi-definite; a singular direction gets 0)."""
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


def _dot(a: Row, b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _median(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
