"""StreamJob: one stream transfer on the receiver — where its bytes go and how far it got.

Reads with `pump(fd, budget)` (non-blocking recvmsg straight into the planned segments,
stream/plan.py) and books every complete buffer with the KvWriter: `placed` for buffers read
into the destination blocks, `accept` for staged ones. With a checksum, each buffer is hashed
as it completes and the last one is booked only once the trailer matched (ChecksumMismatch
otherwise). Errors are typed TransferErrors; the caller (stream/receiver.py) runs `pump` inside
the receiver's `run_step`, which fails the transfer on any of them.

Ownership: writes only into the plan's segments (the reservation's blocks, the plan's scratch,
the connection's staging memory).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from transfer.convert.iov import AGAIN, IoVec, hash_segments, segments
from transfer.payload.receive import InboundTransfer
from transfer.stream.plan import BufferPlan, PartAddresses, plan_buffer
from transfer.wire.errors import ChecksumMismatch, PeerLost


class StreamJob:
    """One stream transfer on the receiver: where its bytes go and how far it got. Buffers are
    planned one at a time as reading reaches them (stream/plan.py); a staged buffer is booked
    before the next one is read, so one staging area per connection suffices."""

    def __init__(self, transfer: InboundTransfer, addresses: PartAddresses | None):
        h = transfer.header
        self.transfer, self.writer, self.addresses = transfer, transfer.writer, addresses
        self.sizes = h.buffer_sizes
        self.payload_bytes = h.payload_bytes
        self.trailer = None  # the checksums sent after the last buffer
        if h.checksum is not None:
            self.trailer = np.zeros(len(h.buffer_sizes), dtype="<u8")
        self.conn: Any = None  # the data connection reading it (stream.receiver._Conn)
        self.index = 0  # buffer being read (len(sizes): the trailer)
        self.done_bytes = 0  # of completed buffers
        self.cur: IoVec | None = None
        self.plan: BufferPlan | None = None
        self.held: BufferPlan | None = None  # the last buffer, booked once the trailer is in
        self.hashes: list[int] = []
        self.last_read, self.blocked = 0, False

    def staging(self, size: int) -> torch.Tensor:
        """The connection's staging memory, grown to `size` bytes (kept for its next transfers)."""
        conn = self.conn
        assert conn is not None
        if conn.staging is None or conn.staging.numel() < size:
            # a device cache (no host addresses): pinned, so its copies to the device run at
            # the bus's speed rather than through the driver's pageable bounce buffer
            pin = self.addresses is None and torch.cuda.is_available()
            conn.staging = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=pin)
        return conn.staging

    @property
    def progress(self) -> str:
        done = self.done_bytes
        if self.cur is not None and self.index < len(self.sizes):
            done += self.cur.done
        return f"{done} of {self.payload_bytes} payload bytes"

    def pump(self, fd: int, budget: int) -> None:
        """Read what is available (up to about `budget` bytes); book every complete buffer."""
        self.last_read, self.blocked = 0, False
        while self.last_read < budget:
            if self.cur is None and not self._next():
                return  # everything is in
            assert self.cur is not None
            n = self.cur.recv(fd)
            if n == AGAIN:
                self.blocked = True
                return
            if n == 0:
                raise PeerLost(f"data connection closed mid-payload ({self.progress})")
            self.last_read += n
            if self.cur.is_done:
                self._complete()

    def _next(self) -> bool:
        n = len(self.sizes)
        if self.index < n:
            self.plan = plan_buffer(self.writer, self.index, self.addresses, self.staging)
            self.cur = IoVec(self.plan.segs)
        elif self.index == n and self.trailer is not None:
            at = np.array([self.trailer.ctypes.data], dtype=np.uint64)
            self.cur = IoVec(segments(at, self.trailer.nbytes))
        else:
            return False
        if self.cur.is_done:  # an empty buffer
            self._complete()
            return self._next() if self.index <= n else False
        return True

    def _complete(self) -> None:
        n, i, plan = len(self.sizes), self.index, self.plan
        self.cur, self.plan = None, None
        self.index += 1
        if i == n:  # the trailer
            self._verify()
            assert self.held is not None
            self._book(n - 1, self.held)
            return
        assert plan is not None
        self.done_bytes += self.sizes[i]
        if self.trailer is not None:
            self.hashes.append(hash_segments(plan.segs))
            if i == n - 1:
                self.held = plan
                return
        self._book(i, plan)

    def _book(self, i: int, plan: BufferPlan) -> None:
        if plan.is_staged:
            self.writer.accept(i, self.staging(self.sizes[i])[:self.sizes[i]], verify=False)
        else:
            self.writer.placed(i, plan.partials)

    def _verify(self) -> None:
        assert self.trailer is not None
        for i, (got, sent) in enumerate(zip(self.hashes, self.trailer.tolist(), strict=True)):
            if got != sent:
                raise ChecksumMismatch(f"buffer {i}: checksum {got:#x} != sent {sent:#x}")
