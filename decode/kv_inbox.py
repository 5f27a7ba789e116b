"""The decode worker's KV endpoint: the transfer layer's receiver bound to this worker's cache.

Contract (see transfer/zmq_receiver.py): `expect()` is called right after blocks are reserved
and before the prefill worker is told where to send; from then on only the receiver writes
those blocks. Each expectation ends exactly once — an arrival (success or typed error, handed
to the worker by `receive()`) or `forget()` (abort/timeout: the worker frees the blocks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import zmq

from engine.llm_engine import LLMEngine
from engine.sequence import Sequence
from transfer.cache import PagedKvCache
from transfer.errors import TransferError
from transfer.header import ReceiverLimits
from transfer.writer import WriteReport
from transfer.zmq_receiver import ZmqKvReceiver, ZmqReceiverConfig


@dataclass
class KvArrival:
    request_id: str
    error: str | None = None
    first_token: int = -1
    first_logprob: list[Any] | None = None  # [token, logprob, [[id, logprob], ...]]
    num_prefill_cached_tokens: int = 0


def _arrival(request_id: str, reports: list[WriteReport]) -> KvArrival:
    meta = reports[-1].meta if reports else {}
    token = meta.get("first_token")
    if not isinstance(token, int) or token < 0:
        return KvArrival(request_id, error="KV arrived without a valid first token")
    cached = meta.get("num_cached_tokens", 0)
    return KvArrival(request_id, None, token, _logprob(meta.get("first_logprob")),
                     cached if isinstance(cached, int) else 0)


def _logprob(raw: object) -> list[Any] | None:
    """[token, logprob, [[id, logprob], ...]] from its JSON form; None when absent or malformed."""
    if not isinstance(raw, str):
        return None
    try:
        tok, lp, top = json.loads(raw)
        return [int(tok), float(lp), [[int(t), float(v)] for t, v in top]]
    except (ValueError, TypeError):
        return None


class KvInbox:
    def __init__(self, ctx: zmq.Context, host: str, engine: LLMEngine, limits: ReceiverLimits,
                 transport: str = "zmq") -> None:
        cache = PagedKvCache(engine.plan.spec, engine.runner.kv_caches)
        nccl = None
        if transport == "nccl":  # raises TransportUnavailable (with what to do) without CUDA/libnccl
            from transfer.nccl_transport import NcclReceiverPlugin
            nccl = NcclReceiverPlugin(engine.config.torch_device)
        self._arrivals: list[KvArrival] = []
        self._registered: list[zmq.Socket | int] = []
        self.num_bytes, self.num_seconds = 0, 0.0
        self.receiver = ZmqKvReceiver(
            cache, ZmqReceiverConfig(endpoint=f"tcp://{host}:0", limits=limits),
            on_complete=self._complete, on_release=self._release, context=ctx, nccl=nccl)
        self.address = self.receiver.endpoint

    @property
    def socket(self) -> zmq.Socket:
        return self.receiver.socket

    def sync_poller(self, poller: zmq.Poller) -> None:
        """Keep `poller` waking on everything the receiver reads: its ROUTER socket and the
        stream data connections (they come and go; call after every `receive`)."""
        want = self.receiver.pollables()
        have = self._registered
        for item in have:
            if item not in want:
                poller.unregister(item)
        for item in want:
            if item not in have:
                poller.register(item, zmq.POLLIN)
        self._registered = want

    def expect(self, request_id: str, seq: Sequence) -> None:
        self.receiver.expect(request_id, list(seq.block_table))

    def forget(self, request_id: str) -> None:
        """Withdraw an expectation (abort, timeout, local prefill); the caller frees the blocks."""
        if not self.receiver.cancel(request_id):
            # It already ended: drop an arrival that the worker has not consumed yet.
            self._arrivals = [a for a in self._arrivals if a.request_id != request_id]

    def receive(self) -> list[KvArrival]:
        """Process what the socket holds (never blocks); return ended expectations."""
        self.receiver.poll(0.0)
        out, self._arrivals = self._arrivals, []
        return out

    def _complete(self, request_id: str, reports: list[WriteReport]) -> None:
        self.num_bytes += sum(r.num_bytes for r in reports)
        self._arrivals.append(_arrival(request_id, reports))

    def _release(self, request_id: str, error: TransferError) -> None:
        self._arrivals.append(KvArrival(request_id, error=f"{type(error).__name__}: {error}"))

    def close(self) -> None:
        self.receiver.close()
