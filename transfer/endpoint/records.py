"""The KV receiver's configuration and its record of one reservation.

`ZmqReceiverConfig` configures a ZmqKvReceiver (endpoint/receiver.py). `Expectation` is one
reservation (`expect`): its blocks, how many transfers fill it, their reports and the keys of
its transfers in flight (each an `InboundTransfer`, payload/receive.py). Both records are
owned and mutated only by the receiver's books (books.py), under the receiver's lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transfer.convert.plan import ConvertOptions
from transfer.convert.writer import WriteReport
from transfer.stream.receiver import StreamReceiverOptions
from transfer.wire.header import ReceiverLimits


@dataclass(frozen=True)
class ZmqReceiverConfig:
    endpoint: str = "tcp://127.0.0.1:0"  # port 0: any free port (read `endpoint` after binding)
    limits: ReceiverLimits = field(default_factory=ReceiverLimits)
    convert: ConvertOptions = field(default_factory=ConvertOptions)
    idle_timeout_s: float = 10.0  # silence mid-transfer before PeerLost
    transfer_timeout_s: float = 120.0  # header to last chunk
    max_inflight: int = 256
    rcvhwm: int = 64  # queued messages per peer before ZMQ pushes back
    heartbeat_ivl_ms: int = 1000
    heartbeat_timeout_ms: int = 10000
    stream: StreamReceiverOptions = field(default_factory=StreamReceiverOptions)  # stream payloads


@dataclass
class RouteStream:
    """The parts one tensor-parallel route (one sender's heads) streamed into a reservation."""

    num_parts: int = 0
    part_tokens: list[int] = field(default_factory=list)  # per layer: tokens the parts cover
    is_done: bool = False  # its last part was admitted


@dataclass
class Expectation:
    request_id: str
    block_table: list[int]
    num_transfers: int
    deadline: float | None
    token: str = ""  # the reservation token a header must carry ("" accepts any)
    reports: list[WriteReport] = field(default_factory=list)
    inflight: set[tuple[bytes, int]] = field(default_factory=set)  # (peer, transfer id)
    num_parts: int = 0  # streamed parts admitted so far (parts.py)
    part_tokens: list[int] = field(default_factory=list)  # per layer: tokens the parts cover
    num_routes: int = 0  # tensor-parallel route transfers admitted so far (parts.py)
    # streamed TP routes, by the model heads they carry (parts.py); their announced count
    route_streams: dict[tuple[int, int], RouteStream] = field(default_factory=dict)
    num_route_streams: int = 0
