"""The KV receiver's configuration and its records of reservations and transfers in flight.

`ZmqReceiverConfig` configures a ZmqKvReceiver (endpoint/receiver.py). `Expectation` is one
reservation (`expect`): its blocks, how many transfers fill it, their reports. `Inflight` is one
transfer whose header was accepted: its peer, header, writer and deadlines. Both are owned and
mutated only by the receiver, under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transfer.convert.plan import ConvertOptions
from transfer.convert.writer import KvWriter, WriteReport
from transfer.stream.receiver import StreamReceiverOptions
from transfer.wire.header import ReceiverLimits, TransferHeader


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
class Expectation:
    request_id: str
    block_table: list[int]
    num_transfers: int
    deadline: float | None
    reports: list[WriteReport] = field(default_factory=list)
    inflight: set[tuple[bytes, int]] = field(default_factory=set)


@dataclass
class Inflight:
    peer: bytes
    header: TransferHeader
    writer: KvWriter
    deadline: float
    idle_deadline: float
    next_chunk: int = 0
    early_report: WriteReport | None = None  # acked once its writes were queued (NCCL status word)
