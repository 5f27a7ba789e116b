"""The prefill side of the seam: `PayloadSender` (a payload path) and `PeerChannel` (the pair's
ZMQ connection as that path sees it).

`ZmqKvSender` (endpoint/sender.py) picks one PayloadSender when it is built (frames/, stream/
or nccl/) and drives every transfer through it, from its own thread:
`connect` → `pack` → `send` → (the ack, unless `send` returned it) → `finish`; `reset` after
the pair's connection was reset or the receiver dropped its end of the path. The path talks to
the receiver only through the `PeerChannel` it is handed (endpoint/channel.py:
`DealerChannel`); headers, acks and errors never leave that ZMQ connection.

Ownership: the source blocks named by the packed message must stay untouched from `pack` until
`finish` (the path may read them until then); the path owns its staging memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import zmq

    from transfer.convert.cache import PagedKvCache
    from transfer.convert.pack import PackedKv


class PeerChannel(Protocol):
    """The pair's ZMQ DEALER connection, during one `ZmqKvSender.send` (one thread)."""

    @property
    def endpoint(self) -> str:
        """The receiver's ZMQ endpoint."""
        ...

    def send_frames(self, frames: Sequence[Any], deadline: float, *, copy: bool = True,
                    track: bool = False) -> zmq.MessageTracker | None:
        """Queue one message (wire/framing.py) for the receiver; TransferTimeout if it cannot be
        queued by `deadline`. `copy=False` sends buffers zero-copy; with `track=True` the
        returned tracker completes once ZMQ has let go of them."""
        ...

    def poll_reply(self, transfer_id: int, timeout_s: float = 0.0,
                   want: bytes | None = None) -> Any:
        """Wait up to `timeout_s` for one reply or connection event. Returns the body of a `want`
        reply to `transfer_id`, else None (other replies, late ones to earlier transfers, are
        dropped); raises the receiver's typed error (ERROR) or PeerLost (connection dropped)."""
        ...

    def wait_reply(self, transfer_id: int, deadline: float, want: bytes) -> Any:
        """`poll_reply` until a `want` reply to `transfer_id` comes; TransferTimeout at the
        deadline."""
        ...

    def wait_writable(self, fd: int, transfer_id: int, timeout_s: float) -> None:
        """Wait up to `timeout_s` until `fd` takes more bytes or a reply comes; a reply is read
        as `poll_reply` does (so a receiver's ERROR for `transfer_id` raises at once)."""
        ...


class PayloadSender(Protocol):
    """One payload path, prefill side; owned by one ZmqKvSender, used from its thread."""

    name: str  # "frames", "stream" or "nccl" (`ZmqKvSender.payload`)
    # a receiver that answers `connect` with TransportUnavailable gets ZMQ frames from then on
    falls_back_to_frames: bool = False
    # seconds the last `send` spent filling buffers (gathers, device-to-host copies); 0 where
    # a path does not measure it
    fill_s: float = 0.0

    def connect(self, channel: PeerChannel, transfer_id: int, deadline: float) -> None:
        """Before packing: set up what this path needs with the receiver unless it is up (the
        stream path's data connection, the NCCL link). Raises typed TransferErrors."""

    def pack(self, cache: PagedKvCache, block_table: Sequence[int], token_start: int,
             token_end: int, **fields: Any) -> PackedKv:
        """Plan the message the way this path moves it (buffer sizes, checksums, staging).
        `fields`: `pack_kv`'s transfer_id, request_id, layer_range, head_range, meta."""
        ...

    def send(self, channel: PeerChannel, packed: PackedKv, deadline: float) -> Any:
        """Send the HEADER and the payload. Returns the receiver's ACK body if it came while
        the path watched the replies, else None (the endpoint then waits for it)."""
        ...

    def finish(self, ok: bool) -> None:
        """The transfer `send` began is over: acked (`ok`) or failed. Staging may be reused."""

    def reset(self) -> None:
        """The pair's connection was reset, or the receiver dropped its end of this path:
        forget everything set up with the receiver (the next `connect` sets it up again)."""

    def close(self) -> None:
        self.reset()
