"""TimelineTracer: a transfer `Tracer` (transfer/payload/trace.py) for bench/transfer.py.

Records one transfer's marks (absolute `time.perf_counter()`: one clock for every process on a
host, so the sender's and the receiver's line up), summed CPU spans and CUDA timing events,
and turns them into the per-side breakdowns in bench/results/transfer_nccl.json. Pass one to
`NcclSenderPlugin(device, tracer=...)` / `NcclReceiverPlugin(device, tracer=...)`; read it once
the transfer is over, then `clear()` it before the next one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class TimelineTracer:
    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.spans: dict[str, float] = {}  # name -> CPU seconds inside, summed
        self.counts: dict[str, int] = {}  # name -> number of spans
        self.events: dict[str, torch.cuda.Event] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spans[name] = self.spans.get(name, 0.0) + time.perf_counter() - t0
            self.counts[name] = self.counts.get(name, 0) + 1

    def gpu_mark(self, name: str, stream: torch.cuda.Stream) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        self.events[name] = event

    def clear(self) -> None:
        self.marks, self.spans, self.counts, self.events = {}, {}, {}, {}

    def gpu_ms(self, start: str, end: str) -> float | None:
        """GPU milliseconds between two events (None if either is missing or failed)."""
        a, b = self.events.get(start), self.events.get(end)
        if a is None or b is None:
            return None
        try:
            b.synchronize()
            return a.elapsed_time(b)
        except RuntimeError:  # not recorded or not complete (a failed transfer)
            return None

    def _since(self, origin: str, name: str, default: str | None = None) -> float:
        at = self.marks.get(name, self.marks.get(default or origin, self.marks[origin]))
        return (at - self.marks[origin]) * 1e3

    def sender_ms(self) -> dict[str, float | None]:
        """The sender's breakdown (ms): CPU marks from payload start, GPU spans."""
        since = self._since
        return {
            "cpu_gathers_queued_ms": since("payload", "gathers_queued"),
            "cpu_ready_ms": since("payload", "ready"),  # eager: no READY, 0
            "cpu_sends_enqueued_ms": since("payload", "all_queued"),
            "cpu_sent_ms": since("payload", "sends_done"),
            "cpu_in_gather_calls_ms": self.spans.get("gather_calls", 0.0) * 1e3,
            "cpu_in_send_calls_ms": self.spans.get("nccl_calls", 0.0) * 1e3,
            "gpu_gather_ms": self.gpu_ms("gather_start", "gather_end"),
            "gpu_nccl_ms": self.gpu_ms("send_start", "send_end"),
            "gpu_gather_to_sent_ms": self.gpu_ms("gather_start", "send_end"),
            "buffers": self.counts.get("gather_calls", 0),
        }

    def receiver_ms(self) -> dict[str, float | None]:
        """The receiver's breakdown (ms): CPU marks from its first receive posted, GPU spans."""
        since = self._since
        return {
            "cpu_recvs_posted_ms": since("post_start", "all_posted"),
            "cpu_writer_ready_ms": since("post_start", "writer_ready"),
            "cpu_writes_queued_ms": since("post_start", "writes_queued"),
            "cpu_written_ms": since("post_start", "written_seen"),
            "cpu_in_recv_calls_ms": self.spans.get("nccl_calls", 0.0) * 1e3,
            "cpu_in_write_calls_ms": since("writer_ready", "writes_queued"),
            "gpu_recv_ms": self.gpu_ms("recv_start", "recv_end"),
            "gpu_first_write_at_ms": self.gpu_ms("recv_start", "write_start"),
            "gpu_write_tail_ms": self.gpu_ms("recv_end", "write_end"),
            "gpu_recv_to_written_ms": self.gpu_ms("recv_start", "write_end"),
        }
