"""Typed ZMQ queues for control messages: one socket carries one MessageFamily.

`Inbox` binds a PULL socket (port 0 = any free port) and yields decoded messages; `Outbox`
connects a PUSH socket and sends them without blocking the caller's loop. A frame that does
not decode is logged (rate-limited), counted in the owner's `Rejections` (reason "malformed")
and dropped: a bad peer cannot take a worker down; when the frame names a request, the owner's
`on_malformed` hears of it, to fail that request alone.

Every socket refuses frames over `max_frame_bytes` (`ZMQ_MAXMSGSIZE`: ZMQ drops the peer as
soon as it reads the length, before a byte is buffered), and the codec decodes what is left
with bounded msgpack (protocol/codec.py), so a frame costs at most its bounded size. An Inbox
decodes with `limits` (the receiver's `max_model_len`, `vocab_size`: protocol/bounds.py).
With a `ClusterAuth` (protocol/auth.py) the Inbox is a CURVE server and the Outbox a CURVE
client: a peer without the deployment's secret never gets a frame through (its refusals are
counted by the auth's handler).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from protocol.auth import ClusterAuth
from protocol.codec import MalformedMessage, MessageFamily
from protocol.log_limit import LogLimiter
from protocol.rejections import Plane, Rejections

log = logging.getLogger(__name__)


DEFAULT_MAX_FRAME_BYTES = 1 << 20


def frame_limit_for(max_model_len: int) -> int:
    """The largest control frame a worker takes: two lists of token or block ids within
    `max_model_len` (5 bytes an id at most), a little more for the rest."""
    return (64 << 10) + 10 * max_model_len


class Inbox:
    def __init__(self, ctx: zmq.Context, family: MessageFamily, host: str, port: int = 0,
                 rejections: Rejections | None = None, plane: Plane = Plane.CONTROL, *,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 limits: Mapping[str, int] | None = None,
                 on_malformed: Callable[[MalformedMessage], None] | None = None,
                 auth: ClusterAuth | None = None) -> None:
        self.family = family
        self.rejections = rejections if rejections is not None else Rejections()
        self.plane = plane
        self.limits = dict(limits or {})
        self.on_malformed = on_malformed
        self.log = LogLimiter(log)
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self.socket.setsockopt(zmq.RCVHWM, 100000)
        if auth is not None:
            auth.server(self.socket, plane.value)
        self.socket.bind(f"tcp://{host}:{port}")
        self.address: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def drain(self, max_messages: int = 1000) -> list[Any]:
        """Every message waiting now (never blocks)."""
        out = []
        for _ in range(max_messages):
            try:
                frame = self.socket.recv(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            try:
                out.append(self.family.decode(frame, self.limits))
            except MalformedMessage as e:
                self.rejections.add(self.plane, "malformed")
                self.log.warning("malformed", "dropped a malformed %s frame: %s",
                                 self.family.name, e)
                if self.on_malformed is not None and e.request_id is not None:
                    self.on_malformed(e)
        return out

    def close(self) -> None:
        self.socket.close(linger=0)


class Outbox:
    def __init__(self, ctx: zmq.Context, family: MessageFamily, address: str,
                 auth: ClusterAuth | None = None) -> None:
        self.family = family
        self.socket = ctx.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 500)
        self.socket.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_FRAME_BYTES)  # it receives nothing
        self.socket.setsockopt(zmq.SNDHWM, 100000)
        if auth is not None:
            auth.client(self.socket)
        self.socket.connect(address)

    def send(self, msg: Any) -> bool:
        """Queue a message; False (and a log line) when the peer's queue is full."""
        try:
            self.socket.send(self.family.encode(msg), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            log.warning("%s queue full: dropped %s", self.family.name, type(msg).__name__)
            return False

    def close(self) -> None:
        self.socket.close(linger=500)
