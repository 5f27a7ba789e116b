"""What the KV endpoints need of the deployment's authentication: a `SocketSecurity`, applied to a
socket before it binds (`server`) or connects (`client`).

The transfer layer knows no secret and no key: the serving layer hands in its
`protocol.auth.ClusterAuth` (which implements this), and tests or benchmarks may hand in their
own or none (plain sockets, as before). With one, the ROUTER and every DEALER are CURVE sockets:
KV headers, acks, errors, the NCCL hello and the stream tokens travel authenticated and encrypted,
and a peer without the deployment's key never reaches the receiver's handler.
"""

from __future__ import annotations

from typing import Protocol

import zmq


class SocketSecurity(Protocol):
    def server(self, sock: zmq.Socket, plane: str) -> None:
        """Before `sock` binds: admit only authenticated peers; count refusals on `plane`."""
        ...

    def client(self, sock: zmq.Socket) -> None:
        """Before `sock` connects: authenticate to the deployment's servers."""
        ...
