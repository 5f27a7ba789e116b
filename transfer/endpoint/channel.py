"""DealerChannel: the prefill side's ZMQ connection to one decode receiver (a `PeerChannel`,
payload/send.py), the only way a payload path reaches its peer.

A DEALER socket (no linger, IMMEDIATE: nothing is queued for a peer that is not connected,
heartbeats) and a monitor socket that reports a dropped connection, so a wait for a reply
ends with PeerLost instead of running into its deadline. Replies are read here: an ERROR
becomes the receiver's typed error (`is_remote=True`), late replies to earlier transfers are
dropped. `reconnect` drops the connection and everything queued on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from transfer.endpoint.security import SocketSecurity
from transfer.wire import framing as proto
from transfer.wire.errors import PeerLost, TransferError, TransferTimeout


class DealerChannel:
    def __init__(self, endpoint: str, context: zmq.Context, *, sndhwm: int = 64,
                 heartbeat_ivl_ms: int = 1000, heartbeat_timeout_ms: int = 10000,
                 security: SocketSecurity | None = None):
        self._endpoint, self._ctx, self._security = endpoint, context, security
        self._options = ((zmq.LINGER, 0), (zmq.SNDHWM, sndhwm), (zmq.IMMEDIATE, 1),
                         (zmq.HEARTBEAT_IVL, heartbeat_ivl_ms),
                         (zmq.HEARTBEAT_TIMEOUT, heartbeat_timeout_ms))
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._replies: zmq.Poller | None = None  # the socket and its monitor (POLLIN)
        self._writable: tuple[int, zmq.Poller] | None = None  # a data descriptor too (POLLOUT)
        self.connect()

    @property
    def endpoint(self) -> str:
        return self._endpoint

    # ---- connection -----------------------------------------------------------------------------
    def connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        for opt, val in self._options:
            sock.setsockopt(opt, val)
        # Every payload frame zero-copy (no small-frame copies): a chunk's tracker (its last
        # part) then covers all of its frames, which ZMQ releases in order.
        sock.copy_threshold = 0
        if self._security is not None:
            self._security.client(sock)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self._endpoint)
        self._sock = sock
        self._replies = zmq.Poller()
        self._replies.register(sock, zmq.POLLIN)
        self._replies.register(self._monitor, zmq.POLLIN)
        self._writable = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close(linger=0)
        if self._monitor is not None:
            self._monitor.close(linger=0)
        self._sock = self._monitor = self._replies = self._writable = None

    def reconnect(self) -> None:
        """Drop the connection and everything queued on it; connect again."""
        self.close()
        self.connect()

    def drain_events(self) -> None:
        """Forget connection events from before now (a new transfer starts)."""
        assert self._monitor is not None
        while self._monitor.poll(0):
            recv_monitor_message(self._monitor)

    # ---- PeerChannel ----------------------------------------------------------------------------
    def send_frames(self, frames: Sequence[Any], deadline: float, *, copy: bool = True,
                    track: bool = False) -> zmq.MessageTracker | None:
        assert self._sock is not None
        self._sock.setsockopt(zmq.SNDTIMEO, max(1, int((deadline - time.monotonic()) * 1000)))
        try:
            return self._sock.send_multipart(frames, copy=copy, track=track)
        except zmq.Again:
            raise TransferTimeout(f"peer {self._endpoint} not reachable or not reading "
                                  f"(send blocked until the deadline)") from None

    def wait_reply(self, transfer_id: int, deadline: float, want: bytes) -> Any:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = "ack" if want == proto.ACK else "reply"
                raise TransferTimeout(f"no {what} from {self._endpoint} before the deadline "
                                      "(the peer may be gone)")
            body = self.poll_reply(transfer_id, remaining, want)
            if body is not None:
                return body

    def poll_reply(self, transfer_id: int, timeout_s: float = 0.0,
                   want: bytes | None = None) -> Any:
        assert self._replies is not None
        return self._read(dict(self._replies.poll(int(timeout_s * 1000))), transfer_id, want)

    def wait_writable(self, fd: int, transfer_id: int, timeout_s: float) -> None:
        assert self._sock is not None and self._monitor is not None
        if self._writable is None or self._writable[0] != fd:
            poller = zmq.Poller()
            poller.register(fd, zmq.POLLOUT)
            poller.register(self._sock, zmq.POLLIN)
            poller.register(self._monitor, zmq.POLLIN)
            self._writable = (fd, poller)
        ready = dict(self._writable[1].poll(max(1, int(timeout_s * 1000))))
        if self._sock in ready or self._monitor in ready:
            self._read(ready, transfer_id, None)

    def _read(self, ready: dict[Any, int], transfer_id: int, want: bytes | None) -> Any:
        """What the ready sockets hold: raise PeerLost or the receiver's error; return the body
        of a `want` reply to `transfer_id`, else None."""
        assert self._sock is not None and self._monitor is not None
        if self._monitor in ready:
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                raise PeerLost(f"connection to {self._endpoint} dropped mid-transfer")
        if self._sock not in ready:
            return None
        kind, rtid, body = proto.parse_reply(self._sock.recv_multipart())
        if rtid is not None and rtid != transfer_id:
            return None  # a late reply to an earlier transfer
        if kind == proto.ERROR:
            raise TransferError.from_wire(body)
        return body if kind == want else None
