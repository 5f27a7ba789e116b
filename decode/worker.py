"""Decode worker: reserves blocks first, receives prompt KV, runs the continuous batch, streams.

Loop (single thread; every wait is bounded):
  1. control messages from the proxy: Reserve / PrefillLocally / Abort / Shutdown;
  2. KV arrivals from prefill workers (validated and converted by transfer/ into the blocks
     this worker reserved; acked there);
  3. queued reservations get blocks as they free up; queue and KV waits time out;
  4. one engine step (decodes + any local prefill chunks), new tokens streamed to the proxy;
  5. a heartbeat with the worker's load every `heartbeat_interval_s`.

Ownership: a reservation's blocks belong to this worker from Reserved until the request
finishes, is aborted, times out, or its transfer fails — each path frees them exactly once. A
transfer that fails on its path (a retryable `TransferError`: sender lost mid-stream, timeout,
corrupted bytes) keeps the blocks, is expected again and reported as `KV_TRANSFER`, so the
proxy retries the prefill elsewhere or here (at most `MAX_KV_RETRIES` times, then `KV_LOST`).
Every message and step is guarded (worker/base.py); a request dropped here (Abort, AbortAll, a
failed step) is reported to the proxy at once as `RequestFailed`, so its client hears of it in
milliseconds, not at a timeout. A reservation is bounded by `--max-model-len` (the codec) and
lives at most `kv_timeout_s` without its KV; expiries are counted (rejections, reason
"reservation_expired").
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from decode.kv_inbox import KvArrival, KvInbox
from decode.tp_inbox import TpKvInbox
from decode.tp_rank import DecodeRankService
from engine.errors import EngineError, RequestError
from engine.llm_engine import LLMEngine, RequestOutput
from engine.sequence import Sequence
from protocol import decode_ctrl as ctrl
from protocol import worker_events as ev
from protocol.errors import ErrorCode
from protocol.rejections import Plane
from worker.base import WorkerBase
from worker.config import WorkerConfig
from worker.tp_link import RankLink

log = logging.getLogger(__name__)


MAX_KV_RETRIES = 2  # path failures after which a reservation is released (KV_LOST)


@dataclass
class Pending:
    """A Reserve waiting for blocks (bounded queue)."""

    msg: ctrl.Reserve
    deadline: float


@dataclass
class Reservation:
    seq: Sequence
    deadline: float  # the prompt KV must have arrived by then
    token: str = ""  # the proxy's reservation token a sender must carry
    retries: int = 0  # transfers that failed on their path and were expected again


class DecodeWorker(WorkerBase):
    role = "decode"

    def __init__(self, config: WorkerConfig, engine: LLMEngine) -> None:
        super().__init__(config, engine, ctrl.DECODE_CTRL)
        self.pending: OrderedDict[str, Pending] = OrderedDict()
        self.reservations: dict[str, Reservation] = {}
        self.local: set[str] = set()  # requests in the engine's own scheduler
        local = KvInbox(self.ctx, config.host, self.kv_cache, config.kv, security=self.auth,
                        on_refused=self._refused)
        link = RankLink.of(engine)  # tensor parallel: every rank receives its own heads
        self.kv: KvInbox | TpKvInbox = TpKvInbox(local, link) if link is not None else local
        self.kv.sync_poller(self.poller)  # the ROUTER socket and the KV data connections

    @property
    def kv_address(self) -> str:
        return self.kv.address

    @property
    def kv_rank_addresses(self) -> list[str]:
        return self.kv.addresses if isinstance(self.kv, TpKvInbox) else []

    @classmethod
    def rank_service(cls, config: WorkerConfig) -> DecodeRankService:
        return DecodeRankService(config.host, config.kv, config.cluster_secret)

    # ---- control ------------------------------------------------------------------------------
    def on_ctrl(self, msg: object) -> None:
        if isinstance(msg, ctrl.Reserve):
            self._on_reserve(msg)
        elif isinstance(msg, ctrl.PrefillLocally):
            res = self.reservations.pop(msg.request_id, None)
            if res is not None:
                self.kv.forget(msg.request_id)
                self.engine.prefill_locally(res.seq)
                self.local.add(msg.request_id)
        elif isinstance(msg, ctrl.Abort):
            if self.holds(msg.request_id):
                self._abort(msg.request_id)
                self.send_failed(msg.request_id, f"aborted: {msg.reason}", ErrorCode.ABORTED)
        elif isinstance(msg, ctrl.AbortAll):
            held = [*self.pending, *self.reservations, *self.local]
            for rid in held:
                self._abort(rid)
                self.send_failed(rid, f"aborted: {msg.reason}", ErrorCode.ABORTED)
            log.warning("dropped %d request(s): %s", len(held), msg.reason)
        elif isinstance(msg, ctrl.Shutdown):
            self.stopping = True

    def _on_reserve(self, msg: ctrl.Reserve) -> None:
        """`msg.params` was validated by its constructor as the codec built it; the engine
        checks what it alone knows (length, blocks). A request id this worker already holds is
        rejected alone: the request that holds it is left as it is."""
        if self.holds(msg.request_id):
            self._reject(msg.request_id, f"duplicate request id {msg.request_id!r}: this decode "
                         "worker already holds a request with it", status=400)
            return
        try:
            if not msg.remote_prefill:
                if self._queue_len() >= self.config.max_queue:
                    self._reject(msg.request_id, "decode worker queue is full")
                    return
                self.engine.add_request(msg.request_id, msg.prompt_ids, msg.params,
                                        msg.prefill_chunk)
                self.local.add(msg.request_id)
                return
            self.engine.scheduler.check_admissible(
                Sequence(msg.request_id, list(msg.prompt_ids), msg.params))
        except (RequestError, EngineError) as e:
            self._reject(msg.request_id, str(e), status=400)
            return
        if len(self.pending) >= self.config.max_queue:
            self._reject(msg.request_id, f"decode worker queue is full ({self.config.max_queue})")
            return
        self.pending[msg.request_id] = Pending(msg, time.monotonic() + msg.queue_timeout_s)
        self._admit_pending()

    def holds(self, request_id: str) -> bool:
        """Queued, reserved or running here."""
        return request_id in self.pending or request_id in self.reservations \
            or request_id in self.local

    def _queue_len(self) -> int:
        return len(self.pending) + len(self.engine.scheduler.waiting)

    def _admit_pending(self) -> None:
        while self.pending:
            rid, p = next(iter(self.pending.items()))
            try:
                seq = self.engine.reserve(rid, p.msg.prompt_ids, p.msg.params)
            except EngineError as e:  # this entry fails alone; the queue moves on
                del self.pending[rid]
                if not isinstance(e, RequestError):
                    log.warning("reservation of %s failed: %s", rid, e)
                self._reject(rid, str(e), status=400)
                continue
            if seq is None:
                return  # first in, first served: wait for blocks
            del self.pending[rid]
            self.reservations[rid] = Reservation(seq, time.monotonic() + self.config.kv_timeout_s,
                                                 p.msg.kv_token)
            self.kv.expect(rid, seq.block_table, p.msg.kv_token)
            self.events.send(ev.Reserved(rid, self.worker_id, list(seq.block_table)))

    def _reject(self, request_id: str, reason: str, status: int = 503) -> None:
        self.events.send(ev.Rejected(request_id, self.worker_id, reason, status, 1.0))

    def fail_request(self, request_id: str) -> bool:
        held = self.holds(request_id)
        self._abort(request_id)
        return held

    def fail_step(self) -> list[str]:
        """Every request in the engine (the step held some of them; which ones is not known
        once it raised)."""
        failed = sorted(self.local)
        for rid in failed:
            self._abort(rid)
        return failed

    def _abort(self, request_id: str) -> None:
        self.pending.pop(request_id, None)
        res = self.reservations.pop(request_id, None)
        if res is not None:
            self.kv.forget(request_id)
            self.engine.release(res.seq)
        if request_id in self.local:
            self.local.discard(request_id)
            self.engine.abort(request_id)

    # ---- KV arrivals --------------------------------------------------------------------------
    def on_kv(self) -> None:
        for arrival in self.kv.receive():
            self._on_arrival(arrival)
        self.kv.sync_poller(self.poller)

    def _on_arrival(self, a: KvArrival) -> None:
        res = self.reservations.pop(a.request_id, None)
        if res is None:
            return
        if a.error is not None and a.retryable and res.retries < MAX_KV_RETRIES:
            # the path failed (sender lost mid-stream, timeout, corrupted bytes): keep the
            # blocks and expect the KV again; the proxy retries the prefill or has it run here
            log.warning("KV for %s failed on its path (%s): expecting it again", a.request_id,
                        a.error)
            res.retries += 1
            res.deadline = time.monotonic() + self.config.kv_timeout_s
            self.reservations[a.request_id] = res
            self.kv.expect(a.request_id, res.seq.block_table, res.token)
            self.events.send(ev.RequestFailed(a.request_id, self.worker_id, a.error,
                                              ErrorCode.KV_TRANSFER))
            return
        if a.error is not None:
            log.warning("KV for %s failed: %s", a.request_id, a.error)
            self.engine.release(res.seq)
            self.events.send(ev.RequestFailed(a.request_id, self.worker_id, a.error,
                                              ErrorCode.KV_LOST))
            return
        res.seq.num_cached_tokens = max(res.seq.num_cached_tokens, a.num_prefill_cached_tokens)
        self.local.add(a.request_id)
        self._emit(self.engine.adopt_prefilled(res.seq, a.first_token, a.first_logprob))

    # ---- the loop's work ----------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.engine.has_unfinished

    def do_work(self) -> None:
        self.on_kv()  # also runs the receiver's deadline checks
        self._admit_pending()
        self._expire()
        if self.engine.has_unfinished:
            for out in self.engine.step():
                self._emit(out)
            self._admit_pending()

    def _emit(self, out: RequestOutput) -> None:
        if out.is_finished:
            self.local.discard(out.request_id)
        if out.prompt_logprobs:  # a local prefill's, before its first token (same socket)
            top_n = max((len(e.top) for e in out.prompt_logprobs), default=0)
            for part in ev.prompt_logprobs_events(out.request_id, self.worker_id,
                                                  out.prompt_logprobs, top_n):
                self.events.send(part)
        self.events.send(ev.Tokens(out.request_id, self.worker_id, out.new_token_ids,
                                   list(out.new_logprobs), out.finish_reason,
                                   out.num_prompt_tokens, out.num_cached_tokens))

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [rid for rid, p in self.pending.items() if p.deadline < now]:
            del self.pending[rid]
            self._reject(rid, "timed out waiting for KV cache blocks")
        for rid in [rid for rid, r in self.reservations.items() if r.deadline < now]:
            res = self.reservations.pop(rid)
            self.kv.forget(rid)
            self.engine.release(res.seq)
            self.rejections.add(Plane.CONTROL, "reservation_expired")
            self.events.send(ev.RequestFailed(rid, self.worker_id,
                                              "prompt KV did not arrive in time",
                                              ErrorCode.KV_TIMEOUT))

    def heartbeat(self) -> ev.Heartbeat:
        pool, scheduler = self.engine.cache.pool, self.engine.scheduler
        return ev.Heartbeat(self.worker_id, self.role, len(scheduler.running), self._queue_len(),
                            pool.num_used, pool.num_free, pool.num_blocks,
                            scheduler.stats.num_preemptions)

    def on_idle(self) -> None:
        if not self.reservations and not self.engine.has_unfinished:
            self.engine.check_idle_integrity()

    def close(self) -> None:
        self.kv.close()
        super().close()
