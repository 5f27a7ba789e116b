"""protocol/auth.py: key derivation from the cluster secret, loading the secret, and the CURVE
handshake with its ZAP handler (the deployment's peers get through; a plain peer, a peer with
another secret and a peer with a foreign client key do not, and each refusal is counted)."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import zmq

from protocol import worker_events as ev
from protocol.auth import (
    SECRET_ENV,
    AuthError,
    ClusterAuth,
    derive_keys,
    generate_secret,
    load_secret,
)
from protocol.channel import Inbox, Outbox
from protocol.rejections import Plane, Rejections

SECRET = bytes(range(32))


def test_keys_are_deterministic_distinct_and_valid() -> None:
    a, b = derive_keys(SECRET), derive_keys(SECRET)
    assert a == b
    assert len({a.server_public, a.server_secret, a.client_public, a.client_secret}) == 4
    assert zmq.curve_public(a.server_secret) == a.server_public
    other = derive_keys(SECRET[:-1] + b"\xff")
    assert other.server_public != a.server_public and other.client_public != a.client_public


def test_short_secrets_are_refused() -> None:
    with pytest.raises(AuthError, match="at least 16"):
        derive_keys(b"short")


def test_secret_from_file_or_environment(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET.hex() + "\n")
    path.chmod(0o600)
    assert load_secret(str(path), env={}) == SECRET
    path.chmod(0o644)
    with pytest.raises(AuthError, match="chmod 600"):
        load_secret(str(path), env={})
    with pytest.raises(AuthError, match="cannot read"):
        load_secret(str(tmp_path / "missing"), env={})
    assert load_secret("", env={SECRET_ENV: SECRET.hex()}) == SECRET
    assert load_secret("", env={}) is None
    with pytest.raises(AuthError, match=SECRET_ENV):
        load_secret("", env={SECRET_ENV: "abcd"})
    assert len(generate_secret()) == 32 and generate_secret() != generate_secret()


class _Peer:
    """A PUSH socket in its own context: plain, with another deployment's keys, or with the
    right server key but a foreign client key."""

    def __init__(self, address: str, kind: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.linger = 0
        self.auth: ClusterAuth | None = None
        if kind == "same":
            self.auth = ClusterAuth(self.ctx, SECRET)
            self.auth.client(self.sock)
        elif kind == "other-secret":
            self.auth = ClusterAuth(self.ctx, generate_secret())
            self.auth.client(self.sock)
        elif kind == "foreign-client-key":
            public, secret = zmq.curve_keypair()
            self.sock.curve_serverkey = derive_keys(SECRET).server_public
            self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
        self.sock.connect(address)

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.close()
        self.ctx.term()


@pytest.mark.parametrize("kind, reason", [("plain", "unauthenticated"),
                                          ("other-secret", "unauthenticated"),
                                          ("foreign-client-key", "bad_key")])
def test_only_the_deployment_gets_through(kind: str, reason: str) -> None:
    ctx = zmq.Context()
    refused: Counter[tuple[str, str]] = Counter()
    auth = ClusterAuth(ctx, SECRET, lambda plane, why: refused.update([(plane, why)]))
    rejections = Rejections()
    inbox = Inbox(ctx, ev.WORKER_EVENTS, "127.0.0.1", rejections=rejections, plane=Plane.EVENTS,
                  auth=auth)
    good, bad = _Peer(inbox.address, "same"), _Peer(inbox.address, kind)
    hello = ev.Heartbeat("decode-0", "decode", 0, 0, 0, 0, 0)
    try:
        forged = ev.Heartbeat("decode-0", "decode", 9, 9, 9, 9, 9)
        for _ in range(5):  # a refused peer has no pipe: nothing is even queued (Again)
            with contextlib.suppress(zmq.Again):
                bad.sock.send(ev.WORKER_EVENTS.encode(forged), zmq.NOBLOCK)
            time.sleep(0.1)
        good.sock.send(ev.WORKER_EVENTS.encode(hello))
        deadline = time.monotonic() + 10
        got: list[object] = []
        while not got or not refused:
            assert time.monotonic() < deadline, f"got {got}, refused {dict(refused)}"
            got += inbox.drain()
            time.sleep(0.05)
        assert got == [hello]  # the deployment's message, and nothing of the other peer's
        assert set(refused) == {("events", reason)}
        assert rejections.count(Plane.EVENTS) == 0  # nothing reached the decoder
    finally:
        good.close()
        bad.close()
        inbox.close()
        auth.close()
        ctx.term()


def test_outbox_to_inbox_with_auth_and_insecure_mode() -> None:
    for secret in (SECRET, None):
        ctx = zmq.Context()
        auth = ClusterAuth(ctx, secret)
        assert auth.is_secure is (secret is not None)
        inbox = Inbox(ctx, ev.WORKER_EVENTS, "127.0.0.1", auth=auth)
        outbox = Outbox(ctx, ev.WORKER_EVENTS, inbox.address, auth=auth)
        msg = ev.Heartbeat("prefill-0", "prefill", 1, 2, 3, 4, 5)
        try:
            assert outbox.send(msg)
            deadline = time.monotonic() + 10
            while not (got := inbox.drain()):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert got == [msg]
        finally:
            outbox.close()
            inbox.close()
            auth.close()
            ctx.term()


def test_the_secret_never_appears_in_a_worker_command_line() -> None:
    from deploy.local_launcher import ServeConfig, worker_command

    os.environ.pop(SECRET_ENV, None)
    cmd = worker_command("decode", "decode-0", "tcp://127.0.0.1:1", ServeConfig(), [], "cpu", 1)
    assert SECRET.hex() not in " ".join(cmd) and "--cluster-secret" not in " ".join(cmd)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    wide = ServeConfig(host="192.0.2.1")  # an HTTP address that is not 127.0.0.1 (never bound)
    cmd = worker_command("decode", "decode-0", "tcp://127.0.0.1:1", wide, [], "cpu", 1)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"  # --internal-host, not the HTTP host


def test_one_authenticator_per_context() -> None:
    ctx = zmq.Context()
    auth = ClusterAuth(ctx, SECRET)
    try:
        with pytest.raises(AuthError, match="one ClusterAuth per ZMQ context"):
            ClusterAuth(ctx, SECRET)
    finally:
        auth.close()
        ctx.term()
