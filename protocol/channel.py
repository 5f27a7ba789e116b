"""Typed ZMQ queues for control messages: one socket carries one MessageFamily.

`Inbox` binds a PULL socket (port 0 = any free port) and yields decoded messages; `Outbox`
connects a PUSH socket and sends them without blocking the caller's loop. A frame that does
not decode is logged, counted in the owner's `Rejections` (reason "malformed") and dropped: a
bad peer cannot take a worker down. With a `ClusterAuth` (protocol/auth.py) the Inbox is a CURVE
server and the Outbox a CURVE client: a peer without the deployment's secret never gets a frame
through (its refusals are counted by the auth's handler).
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from protocol.auth import ClusterAuth
from protocol.codec import MalformedMessage, MessageFamily
from protocol.rejections import Plane, Rejections

log = logging.getLogger(__name__)


class Inbox:
    def __init__(self, ctx: zmq.Context, family: MessageFamily, host: str, port: int = 0,
                 rejections: Rejections | None = None, plane: Plane = Plane.CONTROL,
                 auth: ClusterAuth | None = None) -> None:
        self.family = family
        self.rejections = rejections if rejections is not None else Rejections()
        self.plane = plane
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
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
                out.append(self.family.decode(frame))
            except MalformedMessage as e:
                self.rejections.add(self.plane, "malformed")
                log.warning("dropped a malformed %s frame: %s", self.family.name, e)
        return out

    def close(self) -> None:
        self.socket.close(linger=0)


class Outbox:
    def __init__(self, ctx: zmq.Context, family: MessageFamily, address: str,
                 auth: ClusterAuth | None = None) -> None:
        self.family = family
        self.socket = ctx.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 500)
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
