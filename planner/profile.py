"""A device profile: what `pdserve profile` measured, and the step-time model built from it.

The JSON (`Profile.to_json` / `Profile.from_json`, `version` 1) holds measured points, never
fitted numbers, so a better model can be fitted later from the same file:
- `prefill`: [tokens, seconds]: one prompt prefilled in one step, nothing cached;
- `chunked`: [chunk, context, seconds]: a prefill step of `chunk` new tokens after `context`
  tokens already in the cache (a later chunk of a long prompt, or a prefix-cache hit);
- `decode`: [batch, context, seconds]: a decode step of `batch` sequences of `context` tokens;
- `mixed`: [batch, context, chunk, seconds]: the same decode batch and one prefill chunk
  (a whole prompt of `chunk` tokens, nothing cached);
- `transfers`: per transport, [bytes, seconds] of one KV transfer, or a string saying why it
  was not measured;
- `steps`: [seconds, prefill tokens, decode sequences, context tokens] of every measured step
  (the engine's `StepStats`), what the proxy's cost model is fitted to;
- `engine`: the limits the profile ran with (token budget, max sequences, KV capacity).

`StepTimes` interpolates: prefill time piecewise-linear in tokens plus a fitted term per new
token x context token; decode time bilinear in (batch, context per sequence); a mixed step is
the decode step plus the prefill's marginal cost (its time less a prefill step's fixed cost, the
prefill line at 0 tokens, which the decode step already pays), minus the overlap measured in
`mixed` (0 on a CPU that runs them one after the other, up to the shorter of the two on a GPU
that hides one in the other), times what the mixed rows of the nearest chunk sizes measured
against that (the median over their batches, interpolated over the chunk; 1 where none is
measured): one overlap fitted over 64-1024-token chunks under-timed a 16-token chunk beside one
sequence by a third on this CPU (103 ms modelled, 119-159 ms serving, 2026-12-07).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

VERSION = 1


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the field."""


@dataclass(frozen=True)
class EngineLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    block_size: int
    kv_capacity_tokens: int  # KV cache of one worker, in tokens
    max_model_len: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ProfileError(f"profile engine.{name} must be a positive integer, "
                                   f"got {value!r}")


@dataclass(frozen=True)
class CoRun:
    """Step-time factors for a step that runs while another worker on the same host runs one
    (workers pinned to cores of one CPU share its caches and memory bandwidth): a decode-only
    step is "light", a step with prefill tokens "heavy". Measured by `python -m
    bench.corun_probe` (this 2-core VM, 2026-12-07: light under light 1.25, light under heavy
    1.00, heavy under light 1.08, heavy under heavy 0.99); 1.0 where workers share nothing
    (GPUs)."""

    light_under_light: float = 1.0
    light_under_heavy: float = 1.0
    heavy_under_light: float = 1.0
    heavy_under_heavy: float = 1.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and 0.5 <= value <= 5):
                raise ProfileError(f"co-run factor {name} must be in [0.5, 5], got {value!r}")

    def factor(self, heavy: bool, other_heavy: bool) -> float:
        if heavy:
            return self.heavy_under_heavy if other_heavy else self.heavy_under_light
        return self.light_under_heavy if other_heavy else self.light_under_light

    @classmethod
    def parse(cls, text: str) -> CoRun:
        """"LL,LH,HL,HH" (light under light, light under heavy, ...)."""
        parts = text.split(",")
        try:
            if len(parts) != 4:
                raise ValueError(f"got {len(parts)}")
            return cls(*(float(x) for x in parts))
        except ValueError as e:
            raise ProfileError(f"co-run factors must be four numbers LL,LH,HL,HH: {e}") from None


@dataclass(frozen=True)
class Profile:
    engine: EngineLimits
    kv_bytes_per_token: float
    prefill: list[list[float]]
    decode: list[list[float]]
    chunked: list[list[float]] = field(default_factory=list)
    mixed: list[list[float]] = field(default_factory=list)
    transfers: dict[str, Any] = field(default_factory=dict)
    steps: list[list[float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.kv_bytes_per_token, int | float) and self.kv_bytes_per_token > 0):
            raise ProfileError("profile kv_bytes_per_token must be > 0, "
                               f"got {self.kv_bytes_per_token!r}")
        for name, arity, required in (("prefill", 2, True), ("decode", 3, True),
                                      ("chunked", 3, False), ("mixed", 4, False),
                                      ("steps", 4, False)):
            rows = getattr(self, name)
            if not isinstance(rows, list) or (required and not rows):
                raise ProfileError(f"profile {name} needs at least one measured point")
            for row in rows:
                _check_row(name, row, arity)
        for transport, rows in self.transfers.items():
            if not isinstance(rows, str):
                if not isinstance(rows, list):
                    raise ProfileError(f"profile transfers.{transport} must be a list of "
                                       "[bytes, seconds] or a string (why not measured)")
                for row in rows:
                    _check_row(f"transfers.{transport}", row, 2)

    def synthetic_steps(self) -> list[list[float]]:
        """[seconds, prefill tokens, decode sequences, context tokens] from the measured points
        (the engine's StepStats fields), for a profile written without its raw steps."""
        rows = [[s, n, 0, n] for n, s in self.prefill]
        rows += [[s, c, 0, c + ctx] for c, ctx, s in self.chunked]
        rows += [[s, 0, b, b * ctx] for b, ctx, s in self.decode]
        rows += [[s, c, b, b * ctx + c] for b, ctx, c, s in self.mixed]
        return rows

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"profile is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise ProfileError(f"profile version must be {VERSION}, got "
                               f"{doc.get('version') if isinstance(doc, dict) else doc!r}")
        try:
            engine = EngineLimits(**doc["engine"])
            return cls(engine, doc["kv_bytes_per_token"], doc["prefill"], doc["decode"],
                       doc.get("chunked", []), doc.get("mixed", []), doc.get("transfers", {}),
                       doc.get("steps", []), doc.get("meta", {}))
        except KeyError as e:
            raise ProfileError(f"profile is missing field {e.args[0]!r}") from None
        except TypeError as e:
            raise ProfileError(f"profile engine section: {e}") from None

    @classmethod
    def load(cls, path: str) -> Profile:
        try:
            with open(path) as f:
                return cls.from_json(f.read())
        except OSError as e:
            raise ProfileError(f"cannot read profile {path}: {e}") from None


def _check_row(name: str, row: Any, arity: int) -> None:
    if (not isinstance(row, list | tuple) or len(row) != arity
            or not all(isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in row)):
        raise ProfileError(f"profile {name}: each point is {arity} numbers >= 0, got {row!r}")


def interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys) (xs ascending), extended linearly past both ends."""
    if len(xs) == 1:
        return ys[0]
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    if x1 == x0:
        return y1
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _series(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Points sorted by x, repeated xs averaged, made non-decreasing (a running max): more
    tokens or context never make a step faster, so a dip is measurement noise. (Over a decode
    step's batch size a dip can be real: see `StepTimes.decode_s`.)"""
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(float(x), []).append(float(y))
    xs = sorted(by_x)
    ys, top = [], 0.0
    for x in xs:
        top = max(top, statistics.fmean(by_x[x]))
        ys.append(top)
    return xs, ys


class StepTimes:
    """Seconds of one model step of a worker, interpolated from a profile."""

    def __init__(self, profile: Profile, step_overhead_s: float = 0.0) -> None:
        """`step_overhead_s`: serving time per model step that bare engine steps leave out
        (scheduling, sampling's sync, streaming tokens to the proxy); added to every step."""
        if step_overhead_s < 0:
            raise ProfileError(f"step overhead must be >= 0 s, got {step_overhead_s}")
        self.profile = profile
        self.step_overhead_s = step_overhead_s
        self._prefill = _series([(r[0], r[1]) for r in profile.prefill])
        by_batch: dict[float, list[tuple[float, float]]] = {}
        for batch, ctx, s in profile.decode:
            by_batch.setdefault(float(batch), []).append((ctx, s))
        self._batches = sorted(by_batch)
        self._decode = [_series(by_batch[b]) for b in self._batches]
        self.per_token_context = self._fit_context_term(profile.chunked)
        # a prefill step's cost at 0 tokens (the line through its first two points at 0)
        xs, ys = self._prefill
        self.prefill_fixed_s = (min(max(interp(xs[:2], ys[:2], 0.0), 0.0), ys[0])
                                if len(xs) > 1 else 0.0)
        self.overlap, self.mixed_extra_s = self._fit_mixed(profile.mixed)
        self._mixed_ratio = self._fit_mixed_ratio(profile.mixed)

    def prefill_s(self, tokens: float, token_context: float = 0.0) -> float:
        """A prefill step of `tokens` new tokens (no decodes); `token_context` is the sum over
        its chunks of chunk tokens x tokens already cached before the chunk."""
        if tokens <= 0:
            return 0.0
        base = max(interp(*self._prefill, tokens), 0.0)
        return base + self.per_token_context * token_context

    def decode_s(self, batch: float, context: float) -> float:
        """A decode step of `batch` sequences of `context` tokens each (mean)."""
        if batch <= 0:
            return 0.0
        per_batch = [max(interp(xs, ys, context), 0.0) for xs, ys in self._decode]
        # as measured over the batch: a bigger batch can be faster (this CPU times batch 4
        # below batch 3, every time), but never below the smallest batch (the weights are read
        # once either way), so a profile from a busy machine bends it that far at most
        floor = per_batch[0]
        return max(interp(self._batches, [max(y, floor) for y in per_batch], batch), 1e-9)

    def step_s(self, prefill_tokens: float, token_context: float, decode_seqs: int,
               decode_context: float) -> float:
        """One step: `prefill_tokens` new prompt tokens (`token_context` as in `prefill_s`)
        beside `decode_seqs` decoding sequences holding `decode_context` tokens in all."""
        p = self.prefill_s(prefill_tokens, token_context)
        d = self.decode_s(decode_seqs, decode_context / decode_seqs) if decode_seqs else 0.0
        extra = self.step_overhead_s if p or d else 0.0
        if p and d:
            return self._mixed_s(p, d) * self._ratio_at(prefill_tokens) + extra
        return p + d + extra

    def _mixed_s(self, prefill_s: float, decode_s: float) -> float:
        """A mixed step from its parts, before the per-chunk correction."""
        p = max(prefill_s - self.prefill_fixed_s, 0.0)  # the step's fixed cost is in d already
        return p + decode_s - self.overlap * min(p, decode_s) + self.mixed_extra_s

    def _ratio_at(self, chunk: float) -> float:
        xs, ys = self._mixed_ratio
        return interp(xs, ys, min(max(chunk, xs[0]), xs[-1])) if xs else 1.0

    def transfer_s(self, transport: str, num_bytes: float) -> float:
        rows = self.profile.transfers.get(transport)
        if not isinstance(rows, list) or not rows:
            raise ProfileError(f"the profile has no measured KV transfer over {transport!r} "
                               f"({rows or 'absent'}); measured: {self.measured_transports()}")
        xs, ys = _series([(r[0], r[1]) for r in rows])
        return max(interp(xs, ys, num_bytes), 0.0)

    def measured_transports(self) -> list[str]:
        return [t for t, rows in self.profile.transfers.items() if isinstance(rows, list) and rows]

    def _fit_context_term(self, rows: list[list[float]]) -> float:
        """Seconds per (new token x cached context token), least squares through 0, >= 0."""
        num = den = 0.0
        for chunk, ctx, s in rows:
            extra = s - max(interp(*self._prefill, chunk), 0.0)
            x = chunk * ctx
            num, den = num + x * extra, den + x * x
        return max(num / den, 0.0) if den else 0.0

    def _fit_mixed_ratio(self, rows: list[list[float]]) -> tuple[list[float], list[float]]:
        """Per measured chunk size, the median over its mixed rows of measured / modelled
        (before this correction); interpolated between chunk sizes, flat beyond them."""
        by_chunk: dict[float, list[float]] = {}
        for batch, ctx, chunk, s in rows:
            base = self._mixed_s(self.prefill_s(chunk), self.decode_s(batch, ctx))
            if base > 0 and s > 0:
                by_chunk.setdefault(float(chunk), []).append(s / base)
        xs = sorted(by_chunk)
        return xs, [statistics.median(by_chunk[x]) for x in xs]

    def _fit_mixed(self, rows: list[list[float]]) -> tuple[float, float]:
        """How a mixed step (a prefill chunk beside decodes) differs from its two parts, from
        the profile's mixed rows: (the median share of the shorter part it hides, in [0, 1];
        seconds it costs beyond both parts, >= 0). A CPU hides some of the shorter part; a GPU's
        mixed step runs eagerly (its decode-only steps replay CUDA graphs), so it costs more
        than its parts (H100, 2026-12-06: 7-10 ms more in every row, 64-1024-token chunks):
        where every mixed row costs more than its parts, the median excess is the extra and
        nothing is hidden. (On a CPU the rows scatter a few % around their parts, both ways.)"""
        shares, excess = [], []
        for batch, ctx, chunk, s in rows:
            p = max(self.prefill_s(chunk) - self.prefill_fixed_s, 0.0)
            d = self.decode_s(batch, ctx)
            excess.append(s - p - d)
            if min(p, d) > 0:
                shares.append((p + d - s) / min(p, d))
        if excess and min(excess) > 0:
            return 0.0, statistics.median(excess)
        return (min(max(statistics.median(shares), 0.0), 1.0) if shares else 0.0), 0.0



class BlendedStepTimes(StepTimes):
    """Step and transfer times `weight` of the way from profile `a`'s to profile `b`'s: the
    machine between two profiles of it. A shared VM's decode steps moved 33 % in 18 minutes
    (2026-12-07), so `bench.plan_validate --interpolate` predicts each measured point from the
    profiles taken before and after its sweep, weighted by when the point ran."""

    def __init__(self, a: Profile, b: Profile, weight: float, step_overhead_s: float = 0.0) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ProfileError(f"blend weight must be in [0, 1], got {weight}")
        super().__init__(a, step_overhead_s)
        self.other, self.weight = StepTimes(b, step_overhead_s), weight

    def step_s(self, prefill_tokens: float, token_context: float, decode_seqs: int,
               decode_context: float) -> float:
        args = (prefill_tokens, token_context, decode_seqs, decode_context)
        return ((1.0 - self.weight) * super().step_s(*args)
                + self.weight * self.other.step_s(*args))

    def transfer_s(self, transport: str, num_bytes: float) -> float:
        return ((1.0 - self.weight) * super().transfer_s(transport, num_bytes)
                + self.weight * self.other.transfer_s(transport, num_bytes))
