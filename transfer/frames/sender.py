"""FramesSender: the frames payload path on the prefill side (a `PayloadSender`, payload/send.py).

HEADER, then one DATA message per chunk (`header.chunks`), on the pair's ZMQ connection. The
buffers go out zero-copy (`copy=False`): views of a CPU cache, or gathered staging buffers
from a ring of `staging_slots` chunk-sized slots (StagingPool), each slot refilled only once
ZMQ's tracker says it let go of it. A cache on a GPU is gathered there and copied to host per
buffer. Before each chunk the replies are polled, so a refusal ends the transfer early.

Ownership: views alias the source blocks; they must stay untouched until `finish`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import zmq

from transfer.convert.cache import PagedKvCache
from transfer.convert.pack import PackedKv, PackOptions, StagingPool, pack_kv
from transfer.payload.send import PayloadSender, PeerChannel
from transfer.wire import framing as proto
from transfer.wire.errors import TransferTimeout
from transfer.wire.header import compute_checksum


class FramesSender(PayloadSender):
    name = "frames"

    def __init__(self, options: PackOptions = PackOptions(), *, checksum: bool = False,
                 staging_bytes: int = 1 << 30, staging_slots: int = 8):
        self.options, self.checksum = options, checksum
        self._staging = (staging_bytes, staging_slots)
        self.pool = StagingPool(staging_bytes, ring_slots=staging_slots)

    def pack(self, cache: PagedKvCache, block_table: Sequence[int], token_start: int,
             token_end: int, **fields: Any) -> PackedKv:
        options = self.options
        if cache.device.type != "cpu":  # a GPU cache is gathered, then copied to host
            options = replace(options, allow_views=False)
        return pack_kv(cache, block_table, token_start, token_end, options=options,
                       checksum="xxh3_64" if self.checksum else None, transport="zmq",
                       pool=self.pool, **fields)

    def send(self, channel: PeerChannel, packed: PackedKv, deadline: float) -> Any:
        channel.send_frames(proto.header_frames(packed.header), deadline)
        tid = packed.header.transfer_id
        index = 0
        for chunk_index, chunk in enumerate(packed.iter_chunks()):
            channel.poll_reply(tid)  # raises if the receiver refused the transfer already
            views = [_host_view(b) for b in chunk]
            sums = None
            if packed.header.checksum:
                sums = [compute_checksum("xxh3_64", v) for v in views]
            ring = self.pool.ring_slots > 0
            meta = proto.pack([tid, chunk_index, sums])
            tracker = channel.send_frames([proto.DATA, meta, *views], deadline, copy=False,
                                          track=ring)
            for _ in chunk:  # a ring slot is refilled only once ZMQ has let go of it
                if ring:
                    self.pool.hold(index, lambda t=tracker: _wait_tracker(channel, t, deadline))
                index += 1
        return None

    def finish(self, ok: bool) -> None:
        self.pool.release_all()

    def reset(self) -> None:
        """Frames queued on the old connection may still be read: new staging memory."""
        self.pool = StagingPool(self._staging[0], ring_slots=self._staging[1])


def _host_view(buf: torch.Tensor) -> Any:
    """A zero-copy buffer-protocol view of a 1-D uint8 tensor (host copy for GPU tensors)."""
    if buf.device.type != "cpu":
        buf = buf.cpu()
    return buf.numpy()


def _wait_tracker(channel: PeerChannel, tracker: zmq.MessageTracker | None,
                  deadline: float) -> None:
    if tracker is None:
        return
    try:
        tracker.wait(max(0.0, deadline - time.monotonic()))
    except zmq.NotDone:
        raise TransferTimeout(f"peer {channel.endpoint} stopped reading mid-transfer") from None
