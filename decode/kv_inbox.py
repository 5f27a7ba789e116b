"""The decode worker's KV endpoint: the transfer layer's receiver bound to this worker's cache.

Contract (see transfer/endpoint/receiver.py): `expect()` is called right after blocks are reserved
and before the prefill worker is told where to send; from then on only the receiver writes
those blocks. Each expectation ends exactly once — an arrival (success or typed error, handed
to the worker by `receive()`) or `forget()` (abort/timeout: the worker frees the blocks).

Threaded (default): the receiver serves on its own thread, so KV is read (or its NCCL receives
posted) while the worker runs model steps; arrivals are queued and a wake-up socket in the
worker's poller says when. Not threaded: the receiver runs only when the worker polls it,
between steps (a payload then advances at most one receiver round per model step).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass

import zmq

from engine.outputs import TokenLogprob
from protocol.codec import MalformedMessage
from protocol.kv_meta import FIRST_TOKEN_KEY, FirstToken
from transfer.convert.cache import PagedKvCache
from transfer.convert.writer import WriteReport
from transfer.endpoint.books import RefusedFn
from transfer.endpoint.receiver import ZmqKvReceiver, ZmqReceiverConfig
from transfer.endpoint.security import SocketSecurity
from transfer.wire.errors import TransferError
from worker.config import KvTransportConfig


@dataclass
class KvArrival:
    request_id: str
    error: str | None = None
    first_token: int = -1
    first_logprob: TokenLogprob | None = None
    num_prefill_cached_tokens: int = 0
    retryable: bool = False  # the failure was the path's (`TransferError.retryable`)


def _arrival(request_id: str, reports: list[WriteReport]) -> KvArrival:
    """The KV landed: the first token from the header's meta (protocol/kv_meta.py) of the
    transfer that carries it (the last one; of several TP routes, prefill rank 0's)."""
    metas = [r.meta for r in reports if FIRST_TOKEN_KEY in r.meta] or [{}]
    try:
        first = FirstToken.from_meta(metas[-1])
    except MalformedMessage as e:
        return KvArrival(request_id, error=str(e))
    return KvArrival(request_id, None, first.token_id, first.logprob, first.num_cached_tokens)


class KvInbox:
    def __init__(self, ctx: zmq.Context, host: str, cache: PagedKvCache,
                 config: KvTransportConfig, *, security: SocketSecurity | None = None,
                 on_refused: RefusedFn | None = None, has_first_token: bool = True) -> None:
        """Receive into `cache` (this worker's paged cache and its spec) on `host`, port 0;
        `security`: the deployment's authentication; `on_refused`: counts what was refused;
        `has_first_token` False: a follower TP rank's inbox (rank 0 alone adopts the request,
        so an arrival here needs no first token)."""
        self.has_first_token = has_first_token
        threaded = config.kv_receiver_thread
        nccl = None
        if config.transport == "nccl":  # TransportUnavailable (says what to do) without CUDA/NCCL
            from transfer.nccl.transport import NcclReceiverPlugin
            nccl = NcclReceiverPlugin(cache.device, max_links=config.max_kv_peers)
        self._lock = threading.Lock()  # arrivals: the receiver's thread adds, the worker takes
        self._arrivals: list[KvArrival] = []
        self._registered: list[zmq.Socket | int] = []
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        if threaded:  # the worker's poller wakes on this when arrivals are queued
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        self.receiver = ZmqKvReceiver(
            cache, ZmqReceiverConfig(endpoint=f"tcp://{host}:0", limits=config.limits()),
            on_complete=self._complete, on_release=self._release, context=ctx, nccl=nccl,
            security=security, on_refused=on_refused)
        self.address = self.receiver.endpoint
        if threaded:
            self.receiver.start()

    def sync_poller(self, poller: zmq.Poller) -> None:
        """Keep `poller` waking on what says KV has arrived: the wake-up socket (threaded), or
        everything the receiver reads, its ROUTER socket and the stream data connections (they
        come and go; call after every `receive`)."""
        want = [self._wake_r.fileno()] if self._wake_r is not None else self.receiver.pollables()
        have = self._registered
        for item in have:
            if item not in want:
                poller.unregister(item)
        for item in want:
            if item not in have:
                poller.register(item, zmq.POLLIN)
        self._registered = want

    def expect(self, request_id: str, block_ids: list[int], token: str = "") -> None:
        """From now on the receiver may write `block_ids` (this reservation's blocks), for a
        sender whose header carries `token` (the proxy's reservation token)."""
        self.receiver.expect(request_id, list(block_ids), token=token)

    def forget(self, request_id: str) -> None:
        """Withdraw an expectation (abort, timeout, local prefill); the caller frees the blocks."""
        if not self.receiver.cancel(request_id):
            # It already ended: drop an arrival that the worker has not consumed yet (one still
            # on its way from the receiver's thread is ignored by the worker: no reservation).
            with self._lock:
                self._arrivals = [a for a in self._arrivals if a.request_id != request_id]

    def receive(self) -> list[KvArrival]:
        """Ended expectations since the last call (never blocks). Not threaded: first process
        what the receiver's sockets hold."""
        if self._wake_r is not None:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while self._wake_r.recv(4096):
                    pass
        else:
            self.receiver.poll(0.0)
        with self._lock:
            out, self._arrivals = self._arrivals, []
        return out

    def _arrived(self, arrival: KvArrival) -> None:
        with self._lock:
            self._arrivals.append(arrival)
        if self._wake_w is not None:
            # a full socket holds wake-ups already: the worker will look
            with contextlib.suppress(BlockingIOError, InterruptedError):
                self._wake_w.send(b"\0")

    def _complete(self, request_id: str, reports: list[WriteReport]) -> None:
        self._arrived(_arrival(request_id, reports) if self.has_first_token
                      else KvArrival(request_id))

    def _release(self, request_id: str, error: TransferError) -> None:
        self._arrived(KvArrival(request_id, error=f"{type(error).__name__}: {error}",
                                retryable=error.retryable))

    def close(self) -> None:
        self.receiver.close()  # stops its thread first
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
