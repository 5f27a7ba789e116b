"""Placer: the proxy's running picture of its workers, and the placement of each request.

Keeps, per worker, a step-time cost model fitted to the steps its heartbeats report
(cost_model.py), the work the proxy has placed on it and not yet seen done (prefill queues in
predicted seconds, the decode batch's sequences and context), and which prompt blocks its
prefix cache probably holds (the prompts placed there, LRU-bounded by its cache size). From
those it builds the snapshots placement.py decides on, and learns from what it measures: the
KV transfer rate (PrefillDone) and, per placement, how far measured times to first token fall
from predicted ones (a bounded running correction for hops and queueing it does not model).

Owned by the ClusterClient and used from its event loop only; it never talks to workers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from engine.block_hashes import block_hashes
from protocol import worker_events as ev
from proxy.cost_model import StepCostModel
from proxy.placement import (
    DecodeView,
    Joiner,
    Placement,
    Prediction,
    PrefillView,
    Slo,
    TransferView,
    choose,
    learn_overhead,
)

log = logging.getLogger(__name__)

DEFAULT_TRANSFER_RATE = 1e9  # bytes/s until the first PrefillDone says otherwise
EWMA = 0.2  # weight of the newest measurement in the running averages


class PrefixTracker:
    """Block hashes a worker's prefix cache probably holds: those of the prompts placed on it,
    least recently placed dropped first once there are more than its cache has blocks."""

    def __init__(self, block_size: int, num_blocks: int = 4096) -> None:
        self.block_size, self.num_blocks = block_size, max(1, num_blocks)
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def cached_tokens(self, hashes: list[int], num_prompt_tokens: int) -> int:
        n = 0
        for h in hashes:
            if h not in self._hashes:
                break
            n += 1
        return min(n * self.block_size, max(0, num_prompt_tokens - 1))

    def add(self, hashes: list[int]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.num_blocks:
            self._hashes.popitem(last=False)


@dataclass
class WorkerModel:
    """One worker as the placer sees it."""

    role: str
    max_batched_tokens: int
    kv_bytes_per_token: int
    model: StepCostModel
    prefixes: PrefixTracker
    busy_until: float = 0.0  # when the prefill work placed on it should be done (monotonic)
    pending: dict[str, float] = field(default_factory=dict)  # request -> its prefill seconds
    chunk: int = 0  # decode: the chunk cap of the local prefills it runs now

    def queue_s(self, now: float) -> float:
        return max(0.0, self.busy_until - now)

    def push(self, request_id: str, seconds: float, now: float) -> None:
        self.pending[request_id] = seconds
        self.busy_until = max(self.busy_until, now) + seconds

    def pop(self, request_id: str, now: float) -> None:
        if self.pending.pop(request_id, None) is None:
            return
        # what is left cannot outlast the predictions of what is still pending
        self.busy_until = min(self.busy_until, now + sum(self.pending.values()))
        if not self.pending:
            self.busy_until, self.chunk = now, 0


@dataclass
class Placed:
    """A request the placer is following."""

    prediction: Prediction
    decode_id: str
    num_prompt_tokens: int
    max_tokens: int
    started: float
    num_output_tokens: int = 0


class Placer:
    def __init__(self, mode: Placement, slo: Slo, decode_horizon: float = 64.0) -> None:
        self.mode, self.slo = mode, slo
        self.workers: dict[str, WorkerModel] = {}
        self.requests: dict[str, Placed] = {}
        self.transfer_rate = DEFAULT_TRANSFER_RATE
        self.overhead = {Placement.REMOTE: 0.0, Placement.LOCAL: 0.0}
        self.output_len = decode_horizon  # running mean of finished requests' output tokens

    # ---- workers ------------------------------------------------------------------------------
    def on_hello(self, hello: ev.Hello, num_blocks: int = 4096) -> None:
        spec = hello.kv_spec
        self.workers[hello.worker_id] = WorkerModel(
            hello.role, hello.max_num_batched_tokens or 2048, spec.bytes_per_token,
            StepCostModel(), PrefixTracker(spec.block_size, num_blocks))

    def on_heartbeat(self, hb: ev.Heartbeat) -> None:
        w = self.workers.get(hb.worker_id)
        if w is None:
            return
        w.prefixes.num_blocks = max(1, hb.num_blocks)
        for s in hb.steps:
            w.model.observe(s.seconds, s.num_prefill_tokens, s.num_decode_seqs,
                            s.num_context_tokens)

    # ---- requests -----------------------------------------------------------------------------
    def place(self, request_id: str, prompt_ids: list[int], max_tokens: int, decode_id: str,
              prefill_ids: list[str], mode: Placement | None = None) -> Prediction:
        """Predict both placements on `decode_id` (and the best of `prefill_ids`), choose by
        `mode` (default: the placer's), and start following the request."""
        now = time.monotonic()
        decode = self.workers[decode_id]
        hashes = block_hashes(prompt_ids, decode.prefixes.block_size,
                              len(prompt_ids) // decode.prefixes.block_size)
        prefills = [self._prefill_view(pid, hashes, len(prompt_ids), now)
                    for pid in prefill_ids if pid in self.workers]
        view = self._decode_view(decode_id, hashes, len(prompt_ids), now)
        transfer = self._transfer_view(decode)
        prediction = choose(mode or self.mode, len(prompt_ids), prefills, view, transfer,
                            self.slo)
        if log.isEnabledFor(logging.DEBUG):
            other = choose(Placement.LOCAL if prediction.placement is Placement.REMOTE
                           else Placement.REMOTE, len(prompt_ids), prefills, view, transfer,
                           self.slo)
            log.debug("placed %s (%d tokens): %s; other %s; decode %s; prefill %s",
                      request_id, len(prompt_ids), prediction, other, view, prefills)
        target = decode if prediction.placement is Placement.LOCAL \
            else self.workers[prediction.prefill_id or ""]
        target.push(request_id, prediction.prefill_s, now)
        target.prefixes.add(hashes)
        if prediction.placement is Placement.LOCAL:
            decode.chunk = prediction.chunk or decode.max_batched_tokens
        else:
            decode.prefixes.add(hashes)  # the adopted blocks join its prefix cache too
        self.requests[request_id] = Placed(prediction, decode_id, len(prompt_ids),
                                           max_tokens, now)
        return prediction

    def moved(self, request_id: str, prefill_id: str) -> None:
        """The request's prefill went to `prefill_id` (a routing policy's or a retry's choice,
        not the predicted one): its predicted work moves there."""
        placed, target = self.requests.get(request_id), self.workers.get(prefill_id)
        if placed is None or target is None or placed.prediction.prefill_id == prefill_id:
            return
        now = time.monotonic()
        old = self.workers.get(placed.prediction.prefill_id or "")
        if old is not None:
            old.pop(request_id, now)
        target.push(request_id, placed.prediction.prefill_s, now)
        placed.prediction = dataclasses.replace(placed.prediction, prefill_id=prefill_id)

    def on_prefill_done(self, request_id: str, prefill_id: str, kv_bytes: int,
                        kv_seconds: float) -> None:
        w = self.workers.get(prefill_id)
        if w is not None:
            w.pop(request_id, time.monotonic())
        if kv_bytes > 0 and kv_seconds > 0:
            self.transfer_rate += EWMA * (kv_bytes / kv_seconds - self.transfer_rate)

    def on_tokens(self, request_id: str, num_tokens: int) -> float | None:
        """Tokens arrived for a request; on its first ones, the measured TTFT minus predicted
        (seconds), which also corrects later predictions of its placement."""
        placed = self.requests.get(request_id)
        if placed is None or num_tokens <= 0:
            return None
        first = placed.num_output_tokens == 0
        placed.num_output_tokens += num_tokens
        if not first:
            return None
        now = time.monotonic()
        p = placed.prediction
        for wid in (placed.decode_id, p.prefill_id):
            if wid in self.workers:
                self.workers[wid].pop(request_id, now)
        error = (now - placed.started) - p.ttft_s
        log.debug("first token of %s (%s): %.3f s, predicted %.3f s", request_id,
                  p.placement.value, now - placed.started, p.ttft_s)
        self.overhead[p.placement] = learn_overhead(self.overhead[p.placement], error, self.slo)
        return error

    def on_finished(self, request_id: str) -> None:
        placed = self.requests.pop(request_id, None)
        if placed is None:
            return
        now = time.monotonic()
        for w in self.workers.values():
            w.pop(request_id, now)
        if placed.num_output_tokens:
            self.output_len += EWMA * (placed.num_output_tokens - self.output_len)

    # ---- snapshots ----------------------------------------------------------------------------
    def _prefill_view(self, worker_id: str, hashes: list[int], num_prompt_tokens: int,
                      now: float) -> PrefillView:
        w = self.workers[worker_id]
        return PrefillView(worker_id, w.model.coefficients, w.queue_s(now),
                           w.prefixes.cached_tokens(hashes, num_prompt_tokens),
                           w.max_batched_tokens)

    def _decode_view(self, worker_id: str, hashes: list[int], num_prompt_tokens: int,
                     now: float) -> DecodeView:
        w = self.workers[worker_id]
        running = [r for r in self.requests.values()
                   if r.decode_id == worker_id and r.num_output_tokens > 0]
        landing = [r for r in self.requests.values()
                   if r.decode_id == worker_id and r.num_output_tokens == 0
                   and r.prediction.placement is Placement.REMOTE]
        joining = tuple(Joiner(max(0.0, r.started + r.prediction.ttft_s - now),
                               r.num_prompt_tokens, r.prediction.ttft_s) for r in landing)
        # the output a stall is spread over: the running and joining sequences' expected lengths
        batch = running + landing
        horizon = (sum(self._expected_len(r) for r in batch) / len(batch)) if batch \
            else self.output_len
        return DecodeView(worker_id, w.model.coefficients, len(running),
                          sum(r.num_prompt_tokens + r.num_output_tokens for r in running),
                          w.queue_s(now), w.chunk,
                          w.prefixes.cached_tokens(hashes, num_prompt_tokens),
                          w.max_batched_tokens, horizon, joining)

    def _expected_len(self, r: Placed) -> float:
        """Output tokens a running request will have produced in all, the tokens a stall in its
        stream is spread over in its mean TPOT: the typical length, or twice what it produced
        so far once it outlived that, never more than its max_tokens."""
        return max(1.0, min(float(r.max_tokens),
                            max(self.output_len, 2.0 * r.num_output_tokens)))

    def _transfer_view(self, decode: WorkerModel) -> TransferView:
        return TransferView(decode.kv_bytes_per_token, self.transfer_rate,
                            self.overhead[Placement.REMOTE], self.overhead[Placement.LOCAL])

    def describe(self, worker_id: str) -> dict[str, object]:
        """A worker's current model and load (for /status)."""
        w = self.workers.get(worker_id)
        if w is None:
            return {}
        return {"cost_model": asdict(w.model.coefficients),
                "steps_observed": w.model.num_observed,
                "queued_prefill_s": round(w.queue_s(time.monotonic()), 4)}
