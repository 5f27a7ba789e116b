"""The decode side of the seam: `PayloadReceiver` (a payload path), `ReceiverDesk` (what it may
ask of its receiver) and `InboundTransfer` (one accepted transfer).

`ZmqKvReceiver` (endpoint/receiver.py) holds one PayloadReceiver per transport it takes
(frames/ always; stream/ and nccl/ when available), `attach`es each to its desk (endpoint/
books.py: `TransferBooks`) and routes to it: the ZMQ messages of its `kinds`, and every
accepted header whose `transport` it names. For one transfer the calls come in this order:
`prepare` (header decoded, not yet accepted) → `begin` (accepted: an InboundTransfer with its
writer) → the payload, written through `transfer.writer` inside `desk.run_step` → `end` (the
transfer left the in-flight table: written or failed). `refuse` says that a header from a
peer was refused: its payload must not be written anywhere.

Every call comes from the receiver's polling thread, under its lock; a path never blocks it
longer than its own deadline (NCCL waits for its writes inside `begin`). Ownership: a path
writes only through the transfer's writer (into the reservation's blocks) and into memory it
owns; it never allocates or frees cache blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from transfer.convert.writer import KvWriter, WriteReport
    from transfer.wire.errors import TransferError
    from transfer.wire.header import ReceiverLimits, TransferHeader


@dataclass
class InboundTransfer:
    """One transfer whose header was accepted: its peer, header, writer and deadlines. Owned by
    the receiver's books; a path reads it and pushes `idle_deadline` back as bytes arrive."""

    peer: bytes
    header: TransferHeader
    writer: KvWriter
    deadline: float  # header to last byte
    idle_deadline: float  # silence until then fails it (PeerLost)
    early_report: WriteReport | None = None  # acked before its writes were seen done (NCCL)

    @property
    def key(self) -> tuple[bytes, int]:
        return self.peer, self.header.transfer_id


class ReceiverDesk(Protocol):
    """What a payload path may use of its receiver (called under the receiver's lock)."""

    limits: ReceiverLimits
    idle_timeout_s: float  # silence mid-transfer before PeerLost

    def find(self, peer: bytes, transfer_id: int) -> InboundTransfer | None:
        """The transfer in flight from `peer` with this id, if any."""
        ...

    def run_step(self, transfer: InboundTransfer, step: Callable[[], None]) -> None:
        """Run one step of `transfer`; once its writer has every buffer the transfer is
        finished (acked, booked); on any error it fails (ERROR reply, reservation released)."""
        ...

    def ack_early(self, transfer: InboundTransfer) -> None:
        """Ack now, before the path has seen its writes complete (NCCL: the status word on the
        link follows them); finishing the transfer then sends no second ack."""
        ...

    def reply(self, peer: bytes, frames: list[bytes]) -> None:
        """Queue a message to `peer` (sent once the current message is handled)."""
        ...

    def flush(self) -> None:
        """Send the queued messages now (a path about to block the thread)."""
        ...

    def report(self, peer: bytes, err: TransferError, transfer_id: int | None) -> None:
        """An error outside any transfer in flight (e.g. on a data connection): ERROR reply."""
        ...

    def refused(self, plane: str, reason: str) -> None:
        """Count a refused message or connection on `plane` ("kv", "kv_data", "nccl")."""
        ...


class PayloadReceiver(Protocol):
    """One payload path, decode side. Hooks a path does not need are no-ops here."""

    transport: str  # the header `transport` value it takes ("zmq", "stream", "nccl")
    kinds: tuple[bytes, ...] = ()  # ZMQ message kinds routed to `on_message`
    desk: ReceiverDesk

    def attach(self, desk: ReceiverDesk) -> None:
        """Called once by the receiver that takes this path, before anything else."""
        self.desk = desk

    def on_message(self, peer: bytes, kind: bytes, rest: list[Any]) -> None:
        """A ZMQ message of one of `kinds` (`rest`: its frames after the kind). Raises typed
        TransferErrors, which the receiver answers with an ERROR reply."""

    def prepare(self, peer: bytes, header: TransferHeader) -> None:
        """A header for this path was decoded; it is not accepted yet (it may be refused)."""

    def begin(self, transfer: InboundTransfer) -> None:
        """The header was accepted: take its payload (errors go through `desk.run_step`)."""
        ...

    def end(self, transfer: InboundTransfer, ok: bool) -> None:
        """`transfer` left the in-flight table: written (`ok`) or failed."""

    def refuse(self, peer: bytes) -> None:
        """A header from `peer` was refused: its payload, if one follows, must not be written."""

    def progress(self, transfer: InboundTransfer) -> str:
        """How far `transfer`'s payload got (for a timeout's message)."""
        return "payload not started"

    def fds(self) -> tuple[int, ...]:
        """Descriptors the receiver's poll must wake on (POLLIN), besides its ZMQ socket."""
        return ()

    def service(self, ready: Collection[Any], now: float) -> None:
        """Once per poll round, with what was readable: serve the path's own descriptors."""

    def close(self) -> None:
        """The receiver is closing."""
