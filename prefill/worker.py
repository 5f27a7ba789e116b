"""Prefill worker: batches prompts (chunked), reuses cached prefixes, samples the first token,
ships KV + first token to the decode worker's reservation, frees or caches its blocks on ack.

Loop (single thread; every wait bounded): control messages (Prefill / Abort / Shutdown), KV
acks, one engine step over the waiting prompts, heartbeats.

Ownership of this worker's blocks: from admission until the decode worker acks the transfer,
reports an error, or the transfer's lease (`transfer_timeout_s`) expires. Then they are freed
(full blocks stay in the prefix cache for the next turn of the conversation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.errors import EngineError, RequestError
from engine.llm_engine import LLMEngine
from engine.sequence import Sequence
from engine.tp_group import TpError
from prefill.kv_outbox import KvOutbox, TransferOutcome
from prefill.layer_stream import Chunk, LayerStreamer, StreamDest, take_out
from prefill.tp_outbox import RoutedOutbox
from prefill.tp_rank import PrefillRankService
from protocol import prefill_ctrl as ctrl
from protocol import worker_events as ev
from protocol.errors import ErrorCode
from protocol.kv_meta import FirstToken
from protocol.tp_ranks import StreamChunk, StreamEnd, StreamStep
from worker.base import WorkerBase
from worker.config import WorkerConfig
from worker.tp_link import RankLink

log = logging.getLogger(__name__)


@dataclass
class Job:
    msg: ctrl.Prefill
    seq: Sequence
    is_aborted: bool = False


class PrefillWorker(WorkerBase):
    role = "prefill"

    def __init__(self, config: WorkerConfig, engine: LLMEngine) -> None:
        super().__init__(config, engine, ctrl.PREFILL_CTRL)
        self.jobs: dict[str, Job] = {}  # admitted, not yet acked
        self.kv = KvOutbox(self.ctx, self.kv_cache, config.kv, security=self.auth,
                           on_refused=self._refused)  # results come back through a queue
        # tensor parallel (either side): every rank sends its heads over its routes
        self.link = RankLink.of(engine)
        self.routes = RoutedOutbox(self.kv, self.link)
        self.stream = LayerStreamer(
            engine.runner, self.kv, config.kv.kv_stream_groups, 0,
            self.link.size if self.link else 1,
            self._tell_end if self.link else None) \
            if config.kv.kv_streaming == "layerwise" else None

    @classmethod
    def rank_service(cls, config: WorkerConfig) -> PrefillRankService:
        return PrefillRankService(config.kv, config.cluster_secret)

    @property
    def kv_address(self) -> str:
        return self.kv.address

    # ---- control ------------------------------------------------------------------------------
    def on_ctrl(self, msg: object) -> None:
        if isinstance(msg, ctrl.Prefill):
            self._on_prefill(msg)
        elif isinstance(msg, ctrl.Abort):
            if msg.request_id in self.jobs and not self.jobs[msg.request_id].is_aborted:
                self._abort(msg.request_id)
                self._fail(msg.request_id, f"aborted: {msg.reason}", ErrorCode.ABORTED)
        elif isinstance(msg, ctrl.AbortAll):
            held = [rid for rid, job in self.jobs.items() if not job.is_aborted]
            for rid in held:
                self._abort(rid)
                self._fail(rid, f"aborted: {msg.reason}", ErrorCode.ABORTED)
            log.warning("dropped %d request(s): %s", len(held), msg.reason)
        elif isinstance(msg, ctrl.Shutdown):
            self.stopping = True

    def _abort(self, request_id: str) -> None:
        """Stop a prefill; one whose KV is on the wire ends when the transfer does."""
        job = self.jobs.get(request_id)
        if job is not None:
            job.is_aborted = True
            if self.stream is not None and self.stream.cancel(request_id):
                take_out(self.engine.scheduler, job.seq)  # blocks freed by the outcome
                return
            if self.engine.scheduler.abort(request_id) is not None:  # nothing on the wire yet
                self.routes.forget(request_id)
                del self.jobs[request_id]

    def holds(self, request_id: str) -> bool:
        return request_id in self.jobs

    def fail_request(self, request_id: str) -> bool:
        held = request_id in self.jobs
        self._abort(request_id)
        return held

    def fail_step(self) -> list[str]:
        """The requests still in the engine's scheduler (those with KV on the wire are not in
        the step: their transfers end as they will)."""
        failed = []
        for rid, job in list(self.jobs.items()):
            if self.stream is not None and self.stream.cancel(rid):  # parts on the wire
                take_out(self.engine.scheduler, job.seq)  # blocks freed by the outcome
                job.is_aborted = True
                failed.append(rid)
            elif self.engine.scheduler.abort(rid) is not None:
                self.routes.forget(rid)
                del self.jobs[rid]
                failed.append(rid)
        return failed

    def _on_prefill(self, msg: ctrl.Prefill) -> None:
        """`msg.params` and `msg.kv_spec` were validated by their constructors as the codec
        built them; the engine checks what it alone knows (length, queue, blocks). A request
        id this worker already holds (queued, prefilling or its KV on the wire) fails alone:
        the job that holds it is left as it is."""
        if msg.request_id in self.jobs:
            self._fail(msg.request_id, f"duplicate request id {msg.request_id!r}: this prefill "
                       "worker already holds a request with it", ErrorCode.INVALID_REQUEST)
            return
        if len(self.engine.scheduler.waiting) >= self.config.max_queue:
            self._fail(msg.request_id, f"prefill queue is full ({self.config.max_queue})",
                       ErrorCode.OVERLOADED)
            return
        seq = Sequence(msg.request_id, list(msg.prompt_ids), msg.params)
        try:
            self.engine.scheduler.add(seq)
        except RequestError as e:
            self._fail(msg.request_id, str(e), ErrorCode.INVALID_REQUEST)
            return
        except EngineError as e:  # none is expected: still, this request fails alone
            self._fail(msg.request_id, str(e), ErrorCode.INTERNAL)
            return
        self.jobs[msg.request_id] = Job(msg, seq)

    def _fail(self, request_id: str, error: str, code: ErrorCode) -> None:
        self.events.send(ev.RequestFailed(request_id, self.worker_id, error, code))

    # ---- work ---------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.engine.scheduler.has_work

    def do_work(self) -> None:
        for result in self.routes.poll_results():
            self._on_sent(result)
        scheduler = self.engine.scheduler
        if not scheduler.has_work:
            return
        batch = scheduler.schedule()
        if not batch:
            return
        if self.stream is not None:
            chunks = self.stream.begin_step(batch, {rid: StreamDest.of(job.msg)
                                                    for rid, job in self.jobs.items()
                                                    if not job.is_aborted})
            self._stream_routes(chunks)
        is_computed = False
        try:
            results = self.engine.execute(batch)
            is_computed = True
        finally:
            if self.stream is not None:  # groups whose hooks did not run go now
                self.stream.end_step(is_computed)
        for seq in scheduler.advance(batch, results):
            scheduler.detach(seq)  # its blocks are ours until the decode worker acks
            job = self.jobs.get(seq.seq_id)
            if job is None or job.is_aborted:
                if self.stream is not None and self.stream.cancel(seq.seq_id):
                    continue  # parts on the wire: the outcome frees the blocks
                self.routes.forget(seq.seq_id)
                self.engine.cache.free(seq)
                self.jobs.pop(seq.seq_id, None)
                continue
            self._send(job)

    def _stream_routes(self, chunks: list[Chunk]) -> None:
        """Streamed requests over TP routes: their outcomes combine every route's, of every rank
        (prefill/tp_outbox.py); the followers stream their heads of the same chunks."""
        assert self.stream is not None
        slots = {}
        for chunk in chunks:
            rid = chunk.dest.request_id
            if self.routes.is_routed(chunk.dest.kv_spec):
                slots[rid] = self.routes.stream_slot(rid, self.stream.targets(rid))
        if self.link is not None:
            self.link.tell(StreamStep([StreamChunk(
                slots[c.dest.request_id], c.dest.request_id, c.block_table, c.token_start,
                c.token_end, c.dest.kv_spec, c.dest.addresses, c.dest.kv_token, c.is_final)
                for c in chunks]))

    def _tell_end(self, request_id: str, is_cancel: bool) -> None:
        if self.link is not None:
            self.link.tell(StreamEnd(request_id, is_cancel))

    def _send(self, job: Job) -> None:
        """Queue the KV + first token (protocol/kv_meta.py) for the decode worker."""
        seq, msg = job.seq, job.msg
        if seq.params.prompt_logprobs is not None:  # to the proxy, before the KV leaves
            for part in ev.prompt_logprobs_events(msg.request_id, self.worker_id,
                                                  seq.prompt_logprobs, seq.params.prompt_logprobs):
                self.events.send(part)
        first = FirstToken(seq.token_ids[seq.num_prompt_tokens],
                           seq.logprobs[0] if seq.logprobs else None, seq.num_cached_tokens)
        try:
            if self.stream is not None and self.stream.has_final(msg.request_id):
                self.stream.finish(msg.request_id, first.to_meta())
                return
            if self.routes.is_routed(msg.kv_spec):
                self.routes.send(msg.request_id, msg.kv_spec,
                                 list(msg.kv_rank_addresses) or [msg.kv_address],
                                 seq.block_table, seq.num_prompt_tokens, first.to_meta(),
                                 msg.kv_token)
                return
            self.kv.send(msg.request_id, msg.kv_address, seq.block_table, seq.num_prompt_tokens,
                         msg.kv_spec, first.to_meta(), kv_token=msg.kv_token)
        except TpError:  # a rank is gone: the worker stops (worker/base.py)
            raise
        except Exception as e:  # a typed transfer error, or a socket failure: this request only
            self._on_sent(TransferOutcome.failed(msg.request_id, e))

    def _on_sent(self, outcome: TransferOutcome) -> None:
        job = self.jobs.pop(outcome.request_id, None)
        if job is None:
            return
        if self.stream is not None:  # a part failed mid-prompt: its later parts are dropped
            self.stream.cancel(outcome.request_id)
        if self.engine.scheduler.abort(outcome.request_id) is None:  # not prefilling any more
            self.engine.cache.free(job.seq)  # full blocks stay cached for the next turn
        if outcome.error is None:
            self.events.send(ev.PrefillDone(outcome.request_id, self.worker_id,
                                            job.seq.num_cached_tokens, outcome.num_bytes,
                                            outcome.seconds))
        elif not job.is_aborted:
            log.warning("KV transfer of %s failed: %s", outcome.request_id, outcome.error)
            self._fail(outcome.request_id, outcome.error, outcome.code or ErrorCode.INTERNAL)

    def heartbeat(self) -> ev.Heartbeat:
        pool, scheduler = self.engine.cache.pool, self.engine.scheduler
        return ev.Heartbeat(self.worker_id, self.role, len(scheduler.running),
                            len(scheduler.waiting), pool.num_used, pool.num_free, pool.num_blocks,
                            scheduler.stats.num_preemptions)

    def on_idle(self) -> None:
        for result in self.routes.poll_results():
            self._on_sent(result)
        if not self.jobs and not self.engine.scheduler.has_work:
            self.engine.check_idle_integrity()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.kv.close()
        super().close()
