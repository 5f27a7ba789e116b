"""ClusterClient: the proxy's view of its workers and the owner of every in-flight request.

It binds the workers -> proxy event socket, registers workers as they say Hello, tracks their
heartbeats, routes each request (decode worker by load, prefill worker by prefix), drives the
decode-first lifecycle (Reserve -> Reserved -> Prefill -> Tokens...) and turns every failure
into an error on that request's stream:

- a decode worker silent for `heartbeat_timeout_s`: its requests fail at once, it leaves routing;
- a prefill worker silent, a retryable prefill failure, or KV that failed on its path into the
  decode worker (`KV_TRANSFER` from it: it keeps the blocks): the prefill is retried on another
  prefill worker, or done locally by the decode worker;
- every state has a timeout (queue, prefill, gap between tokens), re-armed at every stage
  change; on timeout or client disconnect the request is aborted on both workers, which free
  its blocks; a worker that drops a request says so at once (`RequestFailed`);
- Reserved / Tokens for a request not held here is aborted on its worker (a forged Reserve);
  event frames are bounded (ZMQ_MAXMSGSIZE); Hellos are judged first (proxy/admission.py).

Registration, heartbeats and the topology view are proxy/cluster_workers.py (`WorkerBook`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from typing import Any

import zmq
import zmq.asyncio

from engine.sampling_params import SamplingParams
from protocol import decode_ctrl as dmsg
from protocol import prefill_ctrl as pmsg
from protocol import worker_events as ev
from protocol.auth import ClusterAuth
from protocol.codec import MalformedMessage
from protocol.errors import ErrorCode
from protocol.log_limit import LogLimiter
from protocol.rejections import Plane
from proxy.admission import failure_error, is_from_registered, serves
from proxy.cluster_state import ClusterConfig, RequestState, Stage, Worker
from proxy.cluster_workers import EVENT_FRAME_BYTES, WorkerBook
from proxy.errors import ApiError, overloaded
from proxy.metrics import ProxyMetrics
from proxy.placement import Placement, Slo
from proxy.placer import Placer
from proxy.router import LeastLoaded, NoWorkerAvailable, PrefixAware, RoundRobin

log = logging.getLogger(__name__)

MAX_ORPHANS = 4096  # request ids recently aborted for being unknown here


class ClusterClient(WorkerBook):
    def __init__(self, config: ClusterConfig, metrics: ProxyMetrics) -> None:
        self.config, self.metrics = config, metrics
        self.ctx = zmq.asyncio.Context()
        self.auth = ClusterAuth(self.ctx, config.secret,
                                lambda plane, reason: metrics.on_rejected("proxy", plane, reason))
        self.events = self.ctx.socket(zmq.PULL)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.setsockopt(zmq.MAXMSGSIZE, EVENT_FRAME_BYTES)
        self.auth.server(self.events, Plane.EVENTS.value)
        self.events.bind(f"tcp://{config.host}:{config.events_port}")
        self.events_address: str = self.events.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers: dict[str, Worker] = {}
        self.inflight: dict[str, RequestState] = {}
        self.decode_policy = RoundRobin() if config.router == "round-robin" else LeastLoaded()
        self.prefill_policy = PrefixAware()
        self.placer = Placer(Placement(config.placement),
                             Slo(config.slo_ttft_s, config.slo_tpot_s))
        self._tasks: list[asyncio.Task] = []
        self._registered = asyncio.Event()
        self._background: set[asyncio.Future] = set()
        self._orphans: OrderedDict[str, None] = OrderedDict()
        self.log = LogLimiter(log)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._event_loop()),
                       asyncio.create_task(self._monitor())]

    async def _broadcast(self, to_decode: object, to_prefill: object) -> None:
        """One control message to every registered worker, without waiting (dropped if it
        can't go)."""
        for w in list(self.workers.values()):
            msg = to_decode if w.hello.role == "decode" else to_prefill
            with contextlib.suppress(zmq.ZMQError):
                await w.socket.send(self._encode_for(w, msg), flags=zmq.NOBLOCK)

    async def close(self) -> None:
        await self._broadcast(dmsg.Shutdown(), pmsg.Shutdown())
        for t in self._tasks:
            t.cancel()
        for w in self.workers.values():
            w.socket.close(linger=100)
        self.events.close(linger=0)
        self.auth.close()
        self.ctx.term()

    async def abort_all(self, reason: str) -> None:
        """Tell every registered worker to drop all its requests (sent before any new one, on
        the same ordered socket): a restarted proxy's predecessor held them."""
        await self._broadcast(dmsg.AbortAll(reason), pmsg.AbortAll(reason))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a send in the background, keeping a reference until it is done."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _encode_for(worker: Worker, msg: object) -> bytes:
        family = dmsg.DECODE_CTRL if worker.hello.role == "decode" else pmsg.PREFILL_CTRL
        return family.encode(msg)

    async def _send(self, worker_id: str | None, msg: object) -> None:
        w = self.workers.get(worker_id or "")
        if w is None or not w.is_alive:
            return
        try:
            await w.socket.send(self._encode_for(w, msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("ctrl queue to %s is full; dropping %s", worker_id, type(msg).__name__)

    # ---- requests -----------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[ev.Tokens]:
        """Yield Tokens events until the request finishes. Raises ApiError on failure.

        Leaving the iteration early (client gone, stop string) aborts the request everywhere.
        """
        try:
            decode = self.decode_policy.choose([w.state for w in self.workers.values()
                                                if w.hello.role == "decode"], prompt_ids)
        except NoWorkerAvailable as e:
            raise overloaded(1.0, f"{e}; retry shortly") from None
        req = RequestState(request_id, prompt_ids, params, asyncio.Queue(), decode.worker_id)
        reserve = self._place(req)
        self.inflight[request_id] = req
        self.workers[decode.worker_id].requests.add(request_id)
        finished = False
        try:
            await self._send(decode.worker_id, reserve)
            while not finished:
                item = await self._next(req)
                if isinstance(item, ApiError):
                    raise item
                finished = item.finish_reason is not None
                yield await self._with_prompt_logprobs(req, item)
        finally:
            self._forget(req)
            if not finished:
                await self._send(req.decode_id, dmsg.Abort(request_id, "client"))
                await self._send(req.prefill_id, pmsg.Abort(request_id, "client"))

    async def _with_prompt_logprobs(self, req: RequestState, item: ev.Tokens) -> ev.Tokens:
        """The first Tokens of a request that asked for prompt logprobs carries them, from
        the PromptLogprobs events of the worker that prefilled it: waited for, as a prefill
        worker's come on another socket than the decode worker's tokens."""
        if req.params.prompt_logprobs is None or len(req.prompt_ids) < 2 \
                or req.prompt_logprobs == []:  # none asked for, none to give, or given
            return item
        if req.prompt_logprobs is None:
            try:
                await asyncio.wait_for(req.prompt_logprobs_arrived.wait(),
                                       self.config.prefill_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(504, f"request {req.request_id}: the prompt logprobs did not "
                               "arrive", "timeout_error", code="timeout") from None
        logprobs, req.prompt_logprobs = req.prompt_logprobs or [], []  # given once
        return replace(item, prompt_logprobs=logprobs)

    def _place(self, req: RequestState) -> dmsg.Reserve:
        """Where the prompt is prefilled (placement.py): the decode worker's Reserve says."""
        prefills = [] if self.config.colocated else \
            [w.hello.worker_id for w in self.alive("prefill")]
        p = self.placer.place(req.request_id, req.prompt_ids, req.params.max_tokens,
                              req.decode_id, prefills)
        remote = p.placement is Placement.REMOTE
        if self.placer.mode is Placement.ADAPTIVE:
            req.preferred_prefill = p.prefill_id
        if not remote:
            req.enter(Stage.PREFILLING)  # on the decode worker, from now on
        self.metrics.on_placement(p.placement.value)
        return dmsg.Reserve(req.request_id, req.prompt_ids, req.params, remote,
                            self.config.queue_timeout_s, 0 if remote else p.chunk, req.kv_token)

    def _stage_timeout(self, stage: Stage) -> float:
        return {Stage.RESERVING: self.config.queue_timeout_s + 5.0,
                Stage.PREFILLING: self.config.prefill_timeout_s,
                Stage.DECODING: self.config.stream_timeout_s}[stage]

    async def _next(self, req: RequestState) -> ev.Tokens | ApiError:
        """The request's next event, or a 504 once it stayed longer in its stage than that
        stage's timeout (re-read as the stage changes: a long prefill gets the prefill's)."""
        while True:
            timeout = self._stage_timeout(req.stage)
            left = req.stage_since + timeout - time.monotonic()
            if left <= 0:
                return ApiError(504, f"request {req.request_id} timed out after {timeout:.0f} s "
                                f"while {req.stage.value}", "timeout_error", code="timeout")
            with contextlib.suppress(asyncio.TimeoutError):
                return await asyncio.wait_for(req.queue.get(), min(left, 1.0))

    def _forget(self, req: RequestState) -> None:
        self.inflight.pop(req.request_id, None)
        self.placer.on_finished(req.request_id)
        for wid in (req.decode_id, req.prefill_id):
            if wid in self.workers:
                self.workers[wid].requests.discard(req.request_id)

    def _start_prefill(self, req: RequestState) -> None:
        candidates = [w.state for w in self.alive("prefill")
                      if w.hello.worker_id not in req.tried_prefill]
        decode = self.workers.get(req.decode_id)
        if not candidates or decode is None:
            req.prefill_id = None
            req.enter(Stage.DECODING)
            self._spawn(self._send(req.decode_id, dmsg.PrefillLocally(req.request_id)))
            return
        preferred = [c for c in candidates if c.worker_id == req.preferred_prefill]
        prefill = preferred[0] if preferred else \
            self.prefill_policy.choose(candidates, req.prompt_ids)
        self.placer.moved(req.request_id, prefill.worker_id)
        req.prefill_id = prefill.worker_id
        req.tried_prefill.add(prefill.worker_id)
        self.workers[prefill.worker_id].requests.add(req.request_id)
        req.enter(Stage.PREFILLING)
        msg = pmsg.Prefill(req.request_id, req.prompt_ids, req.params, req.decode_id,
                           decode.hello.kv_address, req.block_ids, decode.hello.kv_spec,
                           req.kv_token)
        self._spawn(self._send(prefill.worker_id, msg))

    # ---- events -------------------------------------------------------------------------------
    async def _event_loop(self) -> None:
        while True:
            frame = await self.events.recv()
            try:
                msg = ev.WORKER_EVENTS.decode(frame)
            except MalformedMessage as e:
                self._refused("malformed", "dropped a malformed worker event: %s", e)
                continue
            try:
                self._handle(msg)
            except Exception as e:  # a bad event must never kill the proxy's event loop
                self._refused("handler_error", "dropped a worker event that could not be "
                              "handled: %s: %s", type(e).__name__, e)

    def _refused(self, reason: str, fmt: str, *args: object) -> None:
        self.metrics.on_rejected("proxy", Plane.EVENTS.value, reason)
        self.log.warning(reason, fmt, *args)

    def _handle(self, msg: object) -> None:
        if isinstance(msg, ev.Hello):
            self.register(msg)
            return
        worker = self.workers.get(getattr(msg, "worker_id", ""))
        if isinstance(msg, ev.Heartbeat):
            if worker is not None and is_from_registered(worker, msg):
                worker.last_seen = time.monotonic()
                self._on_heartbeat(msg)
            return
        if worker is not None:
            worker.last_seen = time.monotonic()
        if isinstance(msg, ev.PrefillDone):  # counted even when the request has ended meanwhile
            self.metrics.on_kv_transfer(msg.kv_bytes, msg.kv_seconds)
        req = self.inflight.get(getattr(msg, "request_id", ""))
        if req is None:
            if worker is not None and isinstance(msg, ev.Reserved | ev.Tokens):
                self._abort_orphan(worker, msg)
            return
        if not serves(req, msg.worker_id):  # type: ignore[attr-defined]
            self._refused("wrong_worker", "event %s for %s from %s, which does not serve it",
                          type(msg).__name__, req.request_id, msg.worker_id)  # type: ignore
            return
        if isinstance(msg, ev.Reserved):
            req.block_ids = list(msg.block_ids)
            self._start_prefill(req)
        elif isinstance(msg, ev.Tokens):
            req.enter(Stage.DECODING)
            req.queue.put_nowait(msg)
            error = self.placer.on_tokens(req.request_id, len(msg.token_ids))
            if error is not None:
                self.metrics.on_ttft_prediction_error(-error)
        elif isinstance(msg, ev.Rejected):
            err = overloaded(msg.retry_after_s, msg.reason) if msg.status == 503 else \
                ApiError(msg.status, msg.reason, "invalid_request_error")
            req.queue.put_nowait(err)
        elif isinstance(msg, ev.PromptLogprobs):
            req.add_prompt_logprobs(msg)
        elif isinstance(msg, ev.PrefillDone):
            req.num_prefill_cached_tokens = msg.num_cached_tokens
            self.placer.on_prefill_done(req.request_id, msg.worker_id, msg.kv_bytes,
                                        msg.kv_seconds)
        elif isinstance(msg, ev.RequestFailed):
            self._on_failed(req, msg)

    def _on_failed(self, req: RequestState, msg: ev.RequestFailed) -> None:
        """A retryable prefill failure (its code says so) is retried on another prefill worker
        or locally; anything else fails the request."""
        worker = self.workers.get(msg.worker_id)
        if worker is not None and worker.hello.role == "prefill":
            if msg.worker_id != req.prefill_id or req.stage is not Stage.PREFILLING:
                return  # a stale attempt (retried elsewhere, or the KV already arrived)
            if msg.retryable:
                log.warning("prefill of %s failed on %s (%s: %s); retrying", req.request_id,
                            msg.worker_id, msg.code.value, msg.error)
                self._start_prefill(req)
                return
        elif msg.code is ErrorCode.KV_TRANSFER and msg.worker_id == req.decode_id:
            # the decode worker still holds the blocks and expects the KV again
            if req.stage is not Stage.PREFILLING or req.prefill_id is None:
                return  # already prefilling there (PrefillLocally): nothing more arrives
            log.warning("KV of %s from %s failed on arrival at %s (%s); retrying the prefill",
                        req.request_id, req.prefill_id, msg.worker_id, msg.error)
            self._spawn(self._send(req.prefill_id, pmsg.Abort(req.request_id, "kv lost")))
            self._start_prefill(req)
            return
        req.queue.put_nowait(failure_error(msg, req.request_id))

    def _abort_orphan(self, worker: Worker, msg: ev.Reserved | ev.Tokens) -> None:
        """Reserved / Tokens for a request not held here: the worker frees it now."""
        if msg.request_id in self._orphans or (isinstance(msg, ev.Tokens) and msg.finish_reason):
            return
        self._orphans[msg.request_id] = None
        if len(self._orphans) > MAX_ORPHANS:
            self._orphans.popitem(last=False)
        if isinstance(msg, ev.Reserved):
            self._refused("unknown_request", "%s reserved blocks for %s, which the proxy does "
                          "not hold: aborting it there", worker.hello.worker_id, msg.request_id)
        self._spawn(self._send(worker.hello.worker_id, dmsg.Abort(msg.request_id, "unknown")))

    # ---- failure detection ----------------------------------------------------------------------
    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for w in list(self.workers.values()):
                if w.is_alive and now - w.last_seen > self.config.heartbeat_timeout_s:
                    log.error("%s worker %s missed heartbeats for %.1f s: marking it dead",
                              w.hello.role, w.hello.worker_id, now - w.last_seen)
                    # a dead process holds no blocks: its last report must not linger
                    w.state = replace(w.state, is_alive=False, num_running=0, num_waiting=0,
                                      kv_usage=0.0, num_free_blocks=w.state.num_total_blocks)
                    self.metrics.set_worker(w.hello.worker_id, w.hello.role, is_alive=False,
                                            kv_usage=0.0, num_used_blocks=0)
                    self._fail_worker_requests(w, "died")
            self.metrics.set_request_counts(
                sum(1 for r in self.inflight.values() if r.stage is Stage.DECODING),
                sum(1 for r in self.inflight.values() if r.stage is not Stage.DECODING))

    def _fail_worker_requests(self, w: Worker, what: str) -> None:
        for rid in list(w.requests):
            req = self.inflight.get(rid)
            if req is None:
                continue
            if w.hello.role == "prefill" and req.prefill_id == w.hello.worker_id \
                    and req.stage is Stage.PREFILLING:
                log.warning("prefill worker %s %s: retrying prefill of %s", w.hello.worker_id,
                            what, rid)
                self._start_prefill(req)
            elif w.hello.role == "decode":
                req.queue.put_nowait(ApiError(
                    503, f"decode worker {w.hello.worker_id} {what} while serving this request",
                    "service_unavailable", code="worker_lost"))
                self._spawn(self._send(req.prefill_id, pmsg.Abort(rid, "decode lost")))
