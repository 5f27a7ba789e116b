"""Where a prompt is prefilled: on a prefill worker (`remote`) or by its decode worker (`local`).

The choice is a prediction, not a threshold. For each option the rule predicts this request's
time to first token and the time per output token of the decode worker's batch, from the
workers' step-time models (cost_model.py) and what the proxy knows they hold now:
- remote: the prefill worker's queue (seconds of work already sent to it), this prompt's
  uncached tokens in chunks of its token budget, the KV transfer (bytes / measured rate) and
  the hops; if the KV lands while the decode worker runs a local prefill step, its first token
  waits for that step's end. The decode batch then runs with one more sequence.
- local: the decode worker's own queue of local prefills, then this prompt's uncached tokens
  in chunks, each sharing a step with the batch: the running sequences and the remote prompts
  whose KV will land before the prefill ends (`DecodeView.joining`: replayed in the planner's
  simulator, the 2026-12-06 sweep's workload (a) showed whole-prompt local steps on an idle
  decode worker stall the remote prompts landing during them). A joiner is adopted, and makes
  its first token, at the end of the step it lands in: its TTFT with that wait counts in the
  local margin, and its TPOT counts only the steps from its landing on (chunking a prompt for
  a joiner that lands near its end costs the prompt's TTFT for nothing: a sweep on 2026-12-06
  missed 3 s TTFTs that way). With running sequences, only chunk sizes whose step stays within
  the TPOT SLO are tried. The best margin wins and travels to the decode worker as its
  prefill chunk cap. TPOT is a mean over a request's output, so the batch's TPOT is the mean
  step time over the output tokens of its sequences (`horizon_tokens`, the running and
  joining sequences' expected lengths): so many of its steps carry chunks (of the local
  prefills queued there, and of this one), the rest are plain decode steps; the queued local
  work counts against the remote option too.
The option that meets both SLOs with the larger margin (the smaller of its TTFT and TPOT
slack, relative to the SLO) is chosen; when neither does, the one that misses by less. Margins
within `TIE` of each other are decided by the TTFT slack. While the remote option meets both
SLOs with room, local must beat it by more: its first token sooner (or its margin larger) by
`REMOTE_FIRST` (0.25) times the local prefill's time over the TTFT SLO, with a margin no worse,
since a local prefill spends decode time the batch and later arrivals need (a
sweep on 2026-12-06 saw adaptive prefill 30-33 of 40 long prompts locally on near-equal
margins, with the prefill worker idle and the decode batch's TPOT p90 at 264-410 ms). The bias
fades as the remote margin falls below `REMOTE_SAFE`: a prediction that barely meets the SLO is
one prediction error from missing it.
Each placement's TTFT carries a learned correction for what the prediction leaves out
(`learn_overhead`, a running mean of measured minus predicted TTFT).
Short prompts (hops and transfer cost more than the prefill) and prompts the decode worker's
prefix cache mostly covers come out local by this rule, not by a special case; a decode worker
near its TPOT limit sends prompts away.

Pure functions over snapshots: nothing here talks to workers or keeps state.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from proxy.cost_model import Coefficients


class Placement(str, enum.Enum):
    ADAPTIVE = "adaptive"
    REMOTE = "remote"
    LOCAL = "local"


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLOs must be positive, got TTFT {self.ttft_s} s, "
                             f"TPOT {self.tpot_s} s")

    def margin(self, ttft_s: float, tpot_s: float) -> float:
        """The smaller relative slack: 0.2 = 20 % under both; negative = the worse miss."""
        return min((self.ttft_s - ttft_s) / self.ttft_s, (self.tpot_s - tpot_s) / self.tpot_s)


@dataclass(frozen=True)
class PrefillView:
    """One live prefill worker as the proxy predicts it now."""

    worker_id: str
    model: Coefficients
    queue_s: float  # work already sent to it, in predicted seconds still to run
    cached_tokens: int  # of this prompt, expected hits in its prefix cache
    max_batched_tokens: int


class Joiner(NamedTuple):
    """A remote prompt headed to a decode worker whose KV has not landed yet."""

    land_s: float  # seconds from now until its KV should land
    tokens: int  # its prompt tokens
    ttft_s: float  # its predicted time to first token, from its arrival


@dataclass(frozen=True)
class DecodeView:
    """The chosen decode worker as the proxy predicts it now."""

    worker_id: str
    model: Coefficients
    num_running: int  # sequences decoding
    context_tokens: int  # their total context
    local_queue_s: float  # local prefills already placed on it, predicted seconds still to run
    local_chunk: int  # prefill tokens its steps carry while those run (0: none)
    cached_tokens: int  # of this prompt, expected hits in its prefix cache
    max_batched_tokens: int
    horizon_tokens: float = 64.0  # output tokens its running sequences produce in all (mean)
    # remote prefills headed to it, not landed yet; they join the batch a local prefill then
    # runs beside, at the end of the step they land in
    joining: tuple[Joiner, ...] = ()

    def batch_during(self, until_s: float) -> tuple[int, int]:
        """(sequences, context tokens) its batch holds by `until_s` seconds from now: those
        running and those joining before then."""
        landed = [j.tokens for j in self.joining if j.land_s < until_s]
        return self.num_running + len(landed), self.context_tokens + sum(landed)


@dataclass(frozen=True)
class TransferView:
    kv_bytes_per_token: float
    bytes_per_second: float
    remote_overhead_s: float  # hops and adoption, learned from measured TTFTs (>= 0)
    local_overhead_s: float


@dataclass(frozen=True)
class Prediction:
    placement: Placement  # REMOTE or LOCAL
    ttft_s: float
    tpot_s: float
    margin: float
    ttft_margin: float
    prefill_id: str | None = None  # remote: the prefill worker
    chunk: int = 0  # local: the prefill chunk cap per step (0: no cap)
    prefill_s: float = 0.0  # the prompt's own prefill time (added to the chosen queue)


TIE = 0.02
REMOTE_FIRST = 0.25  # margin a local prefill of a whole TTFT SLO's length must win by (choose)
REMOTE_SAFE = 0.2  # remote margin below which that bias fades linearly to nothing (choose)
CORRECTION_EWMA = 0.2  # weight of the newest first token in a placement's TTFT correction
CHUNKS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def learn_overhead(overhead_s: float, error_s: float, slo: Slo) -> float:
    """The running TTFT correction of a placement after one measured first token (`error_s`:
    measured minus predicted TTFT): a running mean (`CORRECTION_EWMA`) of the errors, kept
    within [0, the TTFT SLO]. The placer and the simulator both learn with it."""
    learned = overhead_s + CORRECTION_EWMA * error_s
    return min(max(learned, 0.0), slo.ttft_s)


def prefill_seconds(model: Coefficients, num_tokens: int, chunk: int, decode_seqs: int = 0,
                    context_tokens: int = 0) -> float:
    """Steps of at most `chunk` prompt tokens, each beside `decode_seqs` decoding sequences."""
    if num_tokens <= 0:
        return 0.0
    chunk = max(1, min(chunk, num_tokens))
    steps = math.ceil(num_tokens / chunk)
    # attention over the prompt itself grows through the chunks: on average half of it
    mean_context = context_tokens + num_tokens / 2
    last = num_tokens - (steps - 1) * chunk
    return ((steps - 1) * model.step_seconds(chunk, decode_seqs, mean_context)
            + model.step_seconds(last, decode_seqs, mean_context))


def predict_remote(num_prompt_tokens: int, prefill: PrefillView, decode: DecodeView,
                   transfer: TransferView, slo: Slo) -> Prediction:
    uncached = max(1, num_prompt_tokens - prefill.cached_tokens)
    own = prefill_seconds(prefill.model, uncached, prefill.max_batched_tokens)
    kv_s = num_prompt_tokens * transfer.kv_bytes_per_token / max(transfer.bytes_per_second, 1.0)
    ttft = prefill.queue_s + own + kv_s + transfer.remote_overhead_s
    n, ctx = decode.batch_during(ttft)
    if ttft < decode.local_queue_s:  # lands while local prefills run: waits for their step
        step = (decode.model.step_seconds(decode.local_chunk, n, ctx) if decode.local_chunk
                else decode.local_queue_s)
        ttft += min(decode.local_queue_s - ttft, step)
    exposed = _exposure(decode, decode.local_queue_s, ttft)
    tpot = _batch_tpot(decode, num_prompt_tokens, decode.local_chunk, exposed, n, ctx)
    return Prediction(Placement.REMOTE, ttft, tpot, slo.margin(ttft, tpot),
                      slo.margin(ttft, 0.0), prefill.worker_id, 0, own)


def predict_local(num_prompt_tokens: int, decode: DecodeView, transfer: TransferView,
                  slo: Slo) -> Prediction:
    """The best chunk size for a local prefill on `decode` (its margin decides, counting the
    first tokens of the joiners it delays). The batch it runs beside is the running one and
    the sequences joining it before the prefill ends (`DecodeView.joining`); with running
    sequences, only chunks whose step stays within the TPOT SLO are tried (the smallest
    otherwise), so no single inter-token gap breaks theirs; where even the smallest chunk's
    step breaks it, every chunk whose step is no longer than that one's is tried."""
    uncached = max(1, num_prompt_tokens - decode.cached_tokens)
    best: Prediction | None = None
    for chunk in _chunk_candidates(decode, uncached):
        n, ctx = decode.batch_during(decode.local_queue_s + prefill_seconds(
            decode.model, uncached, chunk, decode.num_running, decode.context_tokens))
        # a step longer than the TPOT SLO would break the TPOT of the batch it runs beside,
        # unless the smallest chunk's step is as long: then chunking finer keeps no gap within
        # the SLO and only multiplies the steps (a GPU below its knee: every step with prefill
        # costs ~50 ms whatever its chunk, against a 40 ms SLO; 16-token chunks turned a
        # 3765-token prompt into 239 such steps and a 12 s TTFT, H100, 2026-12-07)
        if decode.num_running:
            smallest = decode.model.step_seconds(min(CHUNKS[0], uncached), n, ctx)
            if decode.model.step_seconds(chunk, n, ctx) > max(slo.tpot_s, smallest) * (1 + 1e-9):
                continue
        own = prefill_seconds(decode.model, uncached, chunk, n, ctx)
        ttft = decode.local_queue_s + own + transfer.local_overhead_s
        exposed = _exposure(decode, decode.local_queue_s + own)
        tpot = _batch_tpot(decode, num_prompt_tokens, chunk, exposed, n, ctx)
        cap = 0 if chunk >= decode.max_batched_tokens else chunk
        step = decode.model.step_seconds(chunk, n, ctx)  # candidates are <= uncached
        margin = min(slo.margin(ttft, tpot), _joiners_margin(decode, own, step, slo))
        p = Prediction(Placement.LOCAL, ttft, tpot, margin, slo.margin(ttft, 0.0), None, cap,
                       own)
        if best is None or p.margin > best.margin:
            best = p
    assert best is not None  # the smallest candidate is never skipped
    return best


def _joiners_margin(decode: DecodeView, own_s: float, step_s: float, slo: Slo) -> float:
    """The worst TTFT margin among the remote prompts that would land during this local
    prefill (`own_s` seconds after the local ones queued, in steps of `step_s`): each is
    adopted, and makes its first token, at the end of the step it lands in. Those landing
    earlier wait for the queued work whichever way this prompt goes: not counted."""
    start, end = decode.local_queue_s, decode.local_queue_s + own_s
    return min((slo.margin(j.ttft_s + min(end - j.land_s, step_s), 0.0)
                for j in decode.joining if start <= j.land_s < end), default=math.inf)


def _exposure(decode: DecodeView, busy_s: float, new_land_s: float | None = None) -> float:
    """How long the most exposed sequence of the batch decodes beside the local prefills that
    keep the decode worker busy for `busy_s` seconds: all of it for a running sequence; from
    its landing on for one joining (a remote prompt whose KV lands before then, among them
    this request's own at `new_land_s`); nothing when none is there before `busy_s`."""
    starts = [0.0] if decode.num_running else []
    starts += [j.land_s for j in decode.joining if j.land_s < busy_s]
    if new_land_s is not None and new_land_s < busy_s:
        starts.append(new_land_s)
    return busy_s - min(starts) if starts else 0.0


def _batch_tpot(decode: DecodeView, num_prompt_tokens: int, chunk: int, exposed_s: float,
                num_seqs: int, context_tokens: int) -> float:
    """The mean TPOT of the decode batch (`num_seqs` sequences holding `context_tokens`) over
    the output tokens its sequences produce (`horizon_tokens`): for `exposed_s` seconds its
    steps carry local prefill chunks (those queued on it and this prompt's), making a token
    per chunked step; the rest of its tokens come from plain decode steps with this request
    in the batch. A sequence that lands in the middle of a whole-prompt step waits only for
    the rest of it (`_exposure`)."""
    after = decode.model.step_seconds(0, num_seqs + 1, context_tokens + num_prompt_tokens)
    if exposed_s <= 0 or not chunk:
        return after
    during = decode.model.step_seconds(chunk, max(num_seqs, 1), context_tokens)
    horizon = max(decode.horizon_tokens, 1.0)
    stalled = min(exposed_s / max(during, 1e-6), horizon)  # tokens made during the prefills
    return max(after, (stalled * during + (horizon - stalled) * after) / horizon)


def _chunk_candidates(decode: DecodeView, uncached: int) -> list[int]:
    """Every chunk size up to the prompt (or the token budget); the whole prompt alone when
    no sequence runs or joins, since then no step stretches anyone's TPOT."""
    limit = max(1, min(decode.max_batched_tokens, uncached))
    if not decode.num_running and not decode.joining:
        return [limit]
    return [c for c in CHUNKS if c < limit] + [limit]


def choose(mode: Placement, num_prompt_tokens: int, prefills: Sequence[PrefillView],
           decode: DecodeView, transfer: TransferView, slo: Slo) -> Prediction:
    """The placement of one request: `mode` REMOTE or LOCAL forces it (REMOTE falls back to
    LOCAL without a live prefill worker); ADAPTIVE predicts both and keeps the larger margin."""
    local = predict_local(num_prompt_tokens, decode, transfer, slo)
    if mode is Placement.LOCAL or not prefills:
        return local
    remotes = [predict_remote(num_prompt_tokens, p, decode, transfer, slo) for p in prefills]
    remote = max(remotes, key=lambda p: (p.margin, -p.ttft_s))
    if mode is Placement.REMOTE:
        return remote
    # A local prefill spends the decode worker's time, which its running sequences and the ones
    # arriving meanwhile need (their TPOT); a remote one spends only the prefill worker's. While
    # the remote option meets both SLOs, local must beat it by a margin that grows with how long
    # the prompt would hold the decode worker (`REMOTE_FIRST` x its prefill time / the TTFT SLO):
    # a short or mostly cached prompt still goes local, a long one local only as overflow.
    # The bias fades as the remote margin nears zero (`REMOTE_SAFE`): a remote prediction that
    # barely meets the SLOs is one prediction error from missing, so there the larger margin
    # decides alone (the prefill worker's queue, not the decode worker, is then the risk).
    if remote.margin >= 0:
        bias = (REMOTE_FIRST * min(local.prefill_s / slo.ttft_s, 1.0)
                * min(remote.margin / REMOTE_SAFE, 1.0))
        ttft_gain = (remote.ttft_s - local.ttft_s) / slo.ttft_s
        if local.margin >= remote.margin - TIE and ttft_gain > bias:
            return local  # no worse, and sooner by more than it holds the decode worker
        return local if local.margin > remote.margin + bias else remote
    if abs(local.margin - remote.margin) <= TIE:
        return local if local.ttft_margin > remote.ttft_margin else remote
    return local if local.margin > remote.margin else remote
