"""What the security tests attack with: forged messages from peers without the deployment's
secret (a plain ZMQ socket, one keyed by another secret, one with the right server key but a
foreign client key), a secret file for a deployment the test holds the secret of, and where a
`pdserve serve` process and its workers listen (psutil: the proxy's event port is not public)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import psutil
import zmq

from protocol.auth import ClusterAuth, derive_keys, generate_secret

PEER_KINDS = ("plain", "other-secret", "foreign-client-key")


def secret_file(directory: Path) -> tuple[Path, bytes]:
    secret = generate_secret()
    path = directory / "cluster-secret"
    path.write_text(secret.hex())
    path.chmod(0o600)
    return path, secret


def send_as(address: str, frames: list[bytes], kind: str, secret: bytes | None = None,
            socket_type: int = zmq.PUSH, linger_s: float = 1.0) -> None:
    """Send `frames` (one message each) to `address` as a peer of `kind` ("right-key" needs the
    deployment's `secret`); never blocks longer than `linger_s` per message."""
    ctx = zmq.Context()
    auth: ClusterAuth | None = None
    try:
        sock = ctx.socket(socket_type)
        sock.linger = int(linger_s * 1000)
        if kind == "other-secret":
            auth = ClusterAuth(ctx, generate_secret())
            auth.client(sock)
        elif kind == "foreign-client-key":
            public, private = zmq.curve_keypair()
            sock.curve_serverkey = derive_keys(secret or generate_secret()).server_public
            sock.curve_publickey, sock.curve_secretkey = public, private
        elif kind == "right-key":
            assert secret is not None
            auth = ClusterAuth(ctx, secret)
            auth.client(sock)
        sock.connect(address)
        for frame in frames:
            sock.setsockopt(zmq.SNDTIMEO, int(linger_s * 1000))
            with contextlib.suppress(zmq.Again):  # a refused peer never gets a pipe
                sock.send(frame)
        time.sleep(0.3)
        sock.close()
    finally:
        if auth is not None:
            auth.close()
        ctx.term()


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process `pid` listens on."""
    return {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])
