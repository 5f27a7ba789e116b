"""Prefill worker: batches prompts (chunked), reuses cached prefixes, samples the first token,
ships KV + first token to the decode worker's reservation, frees or caches its blocks on ack.

Loop (single thread; every wait bounded): control messages (Prefill / Abort / Shutdown), KV
acks, one engine step over the waiting prompts, heartbeats.

Ownership of this worker's blocks: from admission until the decode worker acks the transfer,
reports an error, or the transfer's lease (`transfer_timeout_s`) expires. Then they are freed
(full blocks stay in the prefix cache for the next turn of the conversation).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from engine.errors import EngineError, RequestError
from engine.kv_spec import KvSpec
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from prefill.kv_outbox import KvOutbox, SendResult
from protocol import prefill_ctrl as ctrl
from protocol import worker_events as ev
from worker.base import WorkerBase
from worker.config import WorkerConfig

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
        self.kv = KvOutbox(self.ctx, self.kv_cache, config.kv)  # results come back through a queue

    @property
    def kv_address(self) -> str:
        return self.kv.address

    # ---- control ------------------------------------------------------------------------------
    def on_ctrl(self, msg: object) -> None:
        if isinstance(msg, ctrl.Prefill):
            self._on_prefill(msg)
        elif isinstance(msg, ctrl.Abort):
            self._abort(msg.request_id)
        elif isinstance(msg, ctrl.AbortAll):
            held = list(self.jobs)
            for rid in held:
                self._abort(rid)
            log.warning("dropped %d request(s): %s", len(held), msg.reason)
        elif isinstance(msg, ctrl.Shutdown):
            self.stopping = True

    def _abort(self, request_id: str) -> None:
        """Stop a prefill; one whose KV is on the wire ends when the transfer does."""
        job = self.jobs.get(request_id)
        if job is not None:
            job.is_aborted = True
            if self.engine.scheduler.abort(request_id) is not None:
                del self.jobs[request_id]

    def _on_prefill(self, msg: ctrl.Prefill) -> None:
        try:
            params = SamplingParams.from_dict(msg.params)
            KvSpec.from_dict(msg.kv_spec)  # validated again by the receiver; fail early here
            seq = Sequence(msg.request_id, list(msg.prompt_ids), params)
            if len(self.engine.scheduler.waiting) >= self.config.max_queue:
                raise EngineError(f"prefill queue is full ({self.config.max_queue})")
            self.engine.scheduler.add(seq)
        except (RequestError, EngineError, ValueError, TypeError) as e:
            self.events.send(ev.RequestFailed(msg.request_id, self.worker_id, str(e), "prefill",
                                              retryable=not isinstance(e, RequestError)))
            return
        self.jobs[msg.request_id] = Job(msg, seq)

    # ---- work ---------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.engine.scheduler.has_work

    def do_work(self) -> None:
        for result in self.kv.poll_results():
            self._on_sent(result)
        scheduler = self.engine.scheduler
        if not scheduler.has_work:
            return
        batch = scheduler.schedule()
        if not batch:
            return
        results = self.engine.runner.execute(batch)
        for seq in scheduler.advance(batch, results):
            scheduler.detach(seq)  # its blocks are ours until the decode worker acks
            job = self.jobs.get(seq.seq_id)
            if job is None or job.is_aborted:
                self.engine.cache.free(seq)
                self.jobs.pop(seq.seq_id, None)
                continue
            self._send(job)

    def _send(self, job: Job) -> None:
        seq, msg = job.seq, job.msg
        lp = seq.logprobs[0] if seq.logprobs else None
        meta = {"first_token": seq.token_ids[seq.num_prompt_tokens],
                # header meta holds scalars only: the logprob entry travels as a short JSON string
                "first_logprob": None if lp is None else json.dumps(
                    [lp.token_id, lp.logprob, [list(t) for t in lp.top]], separators=(",", ":")),
                "num_cached_tokens": seq.num_cached_tokens}
        try:
            self.kv.send(msg.request_id, msg.kv_address, seq.block_table, seq.num_prompt_tokens,
                         KvSpec.from_dict(msg.kv_spec), meta)
        except Exception as e:  # a typed transfer error, or a socket failure: this request only
            self._on_sent(SendResult(msg.request_id, 0, 0.0, f"{type(e).__name__}: {e}", False))

    def _on_sent(self, result: SendResult) -> None:
        job = self.jobs.pop(result.request_id, None)
        if job is None:
            return
        self.engine.cache.free(job.seq)  # full blocks stay cached for the next turn
        if result.error is None:
            self.events.send(ev.PrefillDone(result.request_id, self.worker_id, job.seq.num_cached_tokens,
                                            result.num_bytes, result.seconds))
        elif not job.is_aborted:
            log.warning("KV transfer of %s failed: %s", result.request_id, result.error)
            self.events.send(ev.RequestFailed(result.request_id, self.worker_id, result.error,
                                              "kv_transfer", retryable=result.retryable))

    def heartbeat(self) -> ev.Heartbeat:
        pool, stats = self.engine.cache.pool, self.engine.scheduler.stats
        return ev.Heartbeat(self.worker_id, self.role, len(self.engine.scheduler.running),
                            len(self.engine.scheduler.waiting), pool.num_used, pool.num_free,
                            pool.num_blocks, stats.num_preemptions, stats.num_prefix_hit_tokens,
                            stats.num_prompt_tokens, self.kv.num_bytes, self.kv.num_seconds)

    def on_idle(self) -> None:
        for result in self.kv.poll_results():
            self._on_sent(result)
        if not self.jobs and not self.engine.scheduler.has_work:
            self.engine.check_idle_integrity()

    def close(self) -> None:
        self.kv.close()
        super().close()
