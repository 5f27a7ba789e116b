"""Authentication of the internal planes: one per-deployment secret, ZMQ CURVE keys derived from
it, and a ZAP handler that admits only the deployment's client key.

Who holds what: the launcher generates the secret (`generate_secret`) or reads it from
`--cluster-secret-file` / `PDSERVE_CLUSTER_SECRET`, and hands it to the workers in their
environment (local) or in their actor arguments (Ray), never on a command line. Every component
derives the same two CURVE key pairs from it (`derive_keys`): sockets that bind are CURVE servers
with the server pair; sockets that connect are CURVE clients with the client pair and the
server's public key. A peer without the secret cannot complete a handshake, so its messages never
reach a socket's reader, let alone a handler; CURVE also encrypts and authenticates every frame.

`ClusterAuth` is one per ZMQ context (the ZAP handler is per context): `server(sock, plane)`
before a bind, `client(sock)` before a connect. Its thread answers ZAP requests (a CURVE client
with another key: reason "bad_key") and reads the monitors of the server sockets (a plain or
wrongly keyed peer whose handshake fails: reason "unauthenticated"), and counts each refusal
through `on_refused(plane, reason)`. With no secret (`--insecure-internal`) both methods do
nothing and the planes are open, as before.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.utils.z85
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

SECRET_ENV = "PDSERVE_CLUSTER_SECRET"  # the secret as hex (inherited, never a flag value)
MIN_SECRET_BYTES = 16
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_KDF_SALT = b"pdserve cluster secret v1"
_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_LOG_EVERY_S = 10.0  # one warning per plane and reason in this long (a refused peer retries)
RefusedFn = Callable[[str, str], None]  # (plane, reason)


class AuthError(ValueError):
    """A missing, unreadable or too short cluster secret (says which source and what to do)."""


@dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded CURVE key pairs of a deployment (40 bytes each)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) of `secret`, salt `_KDF_SALT`, for `info`."""
    prk = hmac.new(_KDF_SALT, secret, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + block, i + 1
    return out[:length]


def derive_keys(secret: bytes) -> CurveKeys:
    """The deployment's CURVE keys: deterministic in `secret` (every holder derives the same),
    independent of one another (a curve25519 secret key is any 32 bytes; libsodium clamps)."""
    if len(secret) < MIN_SECRET_BYTES:
        raise AuthError(f"the cluster secret has {len(secret)} bytes; it needs at least "
                        f"{MIN_SECRET_BYTES} (generate one with `openssl rand -hex 32`)")
    server_secret = zmq.utils.z85.encode(_hkdf(secret, b"curve server"))
    client_secret = zmq.utils.z85.encode(_hkdf(secret, b"curve client"))
    return CurveKeys(zmq.curve_public(server_secret), server_secret,
                     zmq.curve_public(client_secret), client_secret)


def generate_secret() -> bytes:
    return secrets.token_bytes(32)


def parse_secret(text: str, source: str) -> bytes:
    """A secret written as hex (e.g. `openssl rand -hex 32`), or any other text of at least
    `MIN_SECRET_BYTES` bytes, taken as it is."""
    text = text.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = text.encode()
    if len(raw) < MIN_SECRET_BYTES:
        raise AuthError(f"{source}: the cluster secret has {len(raw)} bytes; it needs at least "
                        f"{MIN_SECRET_BYTES} (generate one with `openssl rand -hex 32`)")
    return raw


def load_secret(path: str = "", env: dict[str, str] | None = None) -> bytes | None:
    """The secret from `path` (a file only its owner may read) or the `PDSERVE_CLUSTER_SECRET`
    environment variable (the file wins); None when neither is given."""
    if path:
        p = Path(path)
        try:
            mode = p.stat().st_mode
            text = p.read_text()
        except OSError as e:
            raise AuthError(f"--cluster-secret-file {path}: cannot read it ({e})") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AuthError(f"--cluster-secret-file {path}: readable by others (mode "
                            f"{stat.S_IMODE(mode):o}); run `chmod 600 {path}`")
        return parse_secret(text, f"--cluster-secret-file {path}")
    value = (os.environ if env is None else env).get(SECRET_ENV, "")
    return parse_secret(value, SECRET_ENV) if value else None


def secret_env(secret: bytes) -> dict[str, str]:
    """The environment entry that hands `secret` to a child process."""
    return {SECRET_ENV: secret.hex()}


class ClusterAuth:
    def __init__(self, ctx: zmq.Context, secret: bytes | None,
                 on_refused: RefusedFn | None = None) -> None:
        """`ctx`: the context whose sockets this secures (a zmq.asyncio one too); `secret` None:
        no authentication (sockets are left as they are)."""
        self.keys = derive_keys(secret) if secret is not None else None
        self._on_refused = on_refused or (lambda plane, reason: None)
        self._sync = zmq.Context.shadow(ctx.underlying)
        self._lock = threading.Lock()
        self._pending: list[tuple[str, str]] = []  # monitor endpoints to read, with their plane
        self._stop = threading.Event()
        self._monitor_ids = itertools.count()
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # (plane, reason) -> last
        self._thread: threading.Thread | None = None
        self._start_error: str | None = None
        if self.keys is not None:
            ready = threading.Event()
            self._thread = threading.Thread(target=self._serve, args=(ready,), name="zap",
                                            daemon=True)
            self._thread.start()
            if not ready.wait(10) or self._start_error is not None:
                raise AuthError(f"the ZAP handler did not start: {self._start_error or 'timeout'}"
                                " (one ClusterAuth per ZMQ context)")

    @property
    def is_secure(self) -> bool:
        return self.keys is not None

    def server(self, sock: zmq.Socket, plane: str) -> None:
        """Make `sock` (before it binds) a CURVE server that admits only the deployment's
        clients; refusals are counted on `plane`."""
        if self.keys is None:
            return
        sock.curve_secretkey = self.keys.server_secret
        sock.curve_server = True
        sock.zap_domain = str(plane).encode()
        endpoint = f"inproc://pdserve-auth-monitor-{id(self)}-{next(self._monitor_ids)}"
        sock.monitor(endpoint, _FAILED)
        with self._lock:
            self._pending.append((endpoint, str(plane)))

    def client(self, sock: zmq.Socket) -> None:
        """Make `sock` (before it connects) a CURVE client of the deployment's servers."""
        if self.keys is None:
            return
        sock.curve_serverkey = self.keys.server_public
        sock.curve_publickey = self.keys.client_public
        sock.curve_secretkey = self.keys.client_secret

    def close(self) -> None:
        """Stop the ZAP handler (before the context terminates)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---- the handler thread ---------------------------------------------------------------------
    def _serve(self, ready: threading.Event) -> None:
        zap = self._sync.socket(zmq.REP)
        zap.linger = 0
        try:
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as e:
            zap.close(linger=0)
            self._start_error = str(e)
            ready.set()
            return
        ready.set()
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        monitors: dict[zmq.Socket, str] = {}
        try:
            while not self._stop.is_set():
                self._watch_new(poller, monitors)
                for sock, _ in poller.poll(50):
                    if sock is zap:
                        self._answer(zap)
                    else:
                        self._on_monitor(sock, monitors[sock])
        finally:
            for m in monitors:
                m.close(linger=0)
            zap.close(linger=0)

    def _watch_new(self, poller: zmq.Poller, monitors: dict[zmq.Socket, str]) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for endpoint, plane in pending:
            m = self._sync.socket(zmq.PAIR)
            m.linger = 0
            m.connect(endpoint)
            poller.register(m, zmq.POLLIN)
            monitors[m] = plane

    def _answer(self, zap: zmq.Socket) -> None:
        frames = zap.recv_multipart()
        if len(frames) < 6:
            return  # not a ZAP request: nothing to answer
        request_id, domain, mechanism = frames[1], frames[2], frames[5]
        assert self.keys is not None
        ok = mechanism == b"CURVE" and len(frames) == 7 and len(frames[6]) == 32 and \
            hmac.compare_digest(zmq.utils.z85.encode(frames[6]), self.keys.client_public)
        if not ok:
            self._refuse(domain.decode(errors="replace") or "unknown", "bad_key")
        zap.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                            b"OK" if ok else b"not this deployment's key", b"", b""])

    def _on_monitor(self, monitor: zmq.Socket, plane: str) -> None:
        try:
            event = parse_monitor_message(monitor.recv_multipart())
        except (zmq.ZMQError, ValueError):
            return
        if event["event"] & _FAILED:
            self._refuse(plane, "unauthenticated")

    def _refuse(self, plane: str, reason: str) -> None:
        """Count a refusal; warn at most every `_LOG_EVERY_S` per plane and reason."""
        self._on_refused(plane, reason)
        now = time.monotonic()
        last, skipped = self._logged.get((plane, reason), (-_LOG_EVERY_S, 0))
        if now - last < _LOG_EVERY_S:
            self._logged[(plane, reason)] = (last, skipped + 1)
            return
        self._logged[(plane, reason)] = (now, 0)
        what = ("a CURVE key that is not this deployment's" if reason == "bad_key"
                else "a failed handshake (no or another cluster secret)")
        log.warning("refused a peer on the %s plane: %s%s", plane, what,
                    f" ({skipped} more since the last warning)" if skipped else "")
