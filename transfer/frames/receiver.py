"""FramesReceiver: the frames payload path on the decode side (a `PayloadReceiver`,
payload/receive.py).

Takes the DATA messages of accepted "zmq" transfers: chunk i must come after chunk i-1, with
exactly the buffers `header.chunks[i]` names (and their checksums when the header names one);
each buffer is written through the transfer's writer straight from the ZMQ frame (no copy).
A DATA message for a transfer no longer in flight is dropped (a late chunk of a failed one);
one for a transfer whose payload travels another way fails that transfer.
"""

from __future__ import annotations

import time
from typing import Any

from transfer.payload.receive import InboundTransfer, PayloadReceiver
from transfer.wire import framing as proto
from transfer.wire.errors import MalformedFrame


class FramesReceiver(PayloadReceiver):
    transport = "zmq"
    kinds = (proto.DATA,)

    def __init__(self) -> None:
        self._next_chunk: dict[tuple[bytes, int], int] = {}  # per transfer in flight

    def on_message(self, peer: bytes, kind: bytes, rest: list[Any]) -> None:
        if not rest:
            raise MalformedFrame("data message without meta")
        tid, index, sums = proto.data_meta(rest[0].buffer, self.desk.limits.max_buffers)
        transfer = self.desk.find(peer, tid)
        if transfer is None:
            return  # stale chunk of a transfer that already ended: dropped
        self.desk.run_step(transfer, lambda: self._take_chunk(transfer, index, rest[1:], sums))

    def begin(self, transfer: InboundTransfer) -> None:
        self._next_chunk[transfer.key] = 0  # its chunks follow on the ZMQ socket

    def end(self, transfer: InboundTransfer, ok: bool) -> None:
        self._next_chunk.pop(transfer.key, None)

    def progress(self, transfer: InboundTransfer) -> str:
        done = self._next_chunk.get(transfer.key, 0)
        return f"chunk {done} of {len(transfer.header.chunks)}"

    def _take_chunk(self, transfer: InboundTransfer, index: int, frames: list[Any],
                    sums: list[int] | None) -> None:
        h = transfer.header
        if h.transport != self.transport:
            raise MalformedFrame(f"DATA message for a transfer whose payload travels by "
                                 f"{h.transport}")
        expected = self._next_chunk[transfer.key]
        if index != expected or index >= len(h.chunks) or len(frames) != h.chunks[index]:
            raise MalformedFrame(f"chunk {index} with {len(frames)} frames; expected chunk "
                                 f"{expected} of {len(h.chunks)}")
        if h.checksum is not None and (sums is None or len(sums) != len(frames)):
            raise MalformedFrame("checksums missing from a checksummed transfer")
        first = transfer.writer.next_buffer
        for j, frame in enumerate(frames):
            transfer.writer.accept(first + j, frame.buffer, None if sums is None else sums[j])
        self._next_chunk[transfer.key] = index + 1
        transfer.idle_deadline = time.monotonic() + self.desk.idle_timeout_s
