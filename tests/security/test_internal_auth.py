"""Every internal plane of a real deployment refuses peers without its secret (#14 items 1-2):
forged Hello / Tokens on the proxy's event socket, AbortAll / Shutdown / Reserve / Prefill on the
workers' control sockets, forged KV transfers and raw connections to the stream data port. Each
is dropped before any handler and counted in `pdserve:rejected_messages_total`; the victim's
stream is unchanged, no worker dies, /health stays fast and no block leaks.

The deployment (1 prefill + 1 decode, remote placement) is the one other test modules share
(tests/conftest.py, `shared_deployment`; the tests hold its secret): counters are read as
deltas."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import zmq
from attacks import PEER_KINDS, listening_ports, port_of, send_as
from serving import DISAGG, Server

from bench.kv_fill import fill_random
from engine.kv_spec import KvDtype, KvSpec
from engine.sampling_params import SamplingParams
from protocol import decode_ctrl as dmsg
from protocol import prefill_ctrl as pmsg
from protocol import worker_events as ev
from protocol.auth import ClusterAuth, generate_secret
from transfer.convert.cache import PagedKvCache
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.wire.errors import TransferTimeout, UnexpectedTransfer

PROMPT = "The capital of France is"
SPEC = KvSpec(30, 3, 64, 16, dtype=KvDtype.FLOAT32)  # any self-consistent spec: refused before use


@pytest.fixture(scope="module")
def deployment(shared_deployment: Callable[..., Server]) -> tuple[Server, bytes]:
    server = shared_deployment(*DISAGG)
    assert server.secret is not None
    return server, server.secret


def _workers(server: Server) -> dict[str, dict]:
    with server.client() as c:
        return {w["role"]: w for w in c.get("/status").json()["workers"]}


def _complete(server: Server, max_tokens: int = 24) -> str:
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": max_tokens,
                                            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]


def _rejected(server: Server, labels: str) -> float:
    return server.metric("pdserve:rejected_messages_total", labels)


def _wait_metric(server: Server, labels: str, at_least: float, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (n := _rejected(server, labels)) < at_least:
        assert time.monotonic() < deadline, f"{labels}: {n} < {at_least}"
        time.sleep(0.3)


def _wait_counted(server: Server, before: dict[str, float], wanted: dict[str, int]) -> None:
    """Each of `wanted`'s labels counted at least that many more refusals than `before`."""
    for labels, more in wanted.items():
        _wait_metric(server, labels, before[labels] + more)


def _health_is_fast(server: Server) -> None:
    with server.client(timeout=5.0) as c:
        t0 = time.monotonic()
        assert c.get("/health").status_code == 200
        assert time.monotonic() - t0 < 2.0


def test_forged_control_and_events_are_dropped_and_counted(
        deployment: tuple[Server, bytes]) -> None:
    server, secret = deployment
    reference = _complete(server)
    workers = _workers(server)
    pids = {role: w["pid"] for role, w in workers.items()}
    wanted = {'component="proxy",plane="events",reason="unauthenticated"': 2,
              'component="proxy",plane="events",reason="bad_key"': 1}
    for wid in ("decode-0", "prefill-0"):
        wanted[f'component="{wid}",plane="control",reason="unauthenticated"'] = 2
        wanted[f'component="{wid}",plane="control",reason="bad_key"'] = 1
    before = {labels: _rejected(server, labels) for labels in [*wanted, 'reason="malformed"']}
    events = [f"tcp://127.0.0.1:{p}" for p in listening_ports(server.proc.pid)
              if p != port_of(server.url)]
    trap = socket.create_server(("127.0.0.1", 0))  # a forged Prefill's kv_address
    trap.settimeout(0.5)
    params = SamplingParams(max_tokens=5000, ignore_eos=True)
    spec = KvSpec(30, 3, 64, 16)
    hello = ev.Hello("decode-0", "decode", "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", spec, "", 1,
                     "x")
    forged_events = [ev.WORKER_EVENTS.encode(m) for m in (
        hello, ev.Tokens("cmpl-any", "decode-0", [1, 2, 3], finish_reason=None))]
    forged_decode = [dmsg.DECODE_CTRL.encode(m) for m in (
        dmsg.Reserve("forged", list(range(5000)), params), dmsg.AbortAll("forged"),
        dmsg.Shutdown())]
    forged_prefill = [pmsg.PREFILL_CTRL.encode(m) for m in (
        pmsg.Prefill("forged", [1, 2, 3], params, "decode-0",
                     f"tcp://127.0.0.1:{trap.getsockname()[1]}", [0], spec),
        pmsg.AbortAll("forged"), pmsg.Shutdown())]
    victim: list[str] = []
    thread = threading.Thread(target=lambda: victim.append(_complete(server)))
    thread.start()
    targets = [*((address, forged_events) for address in events),
               (workers["decode"]["ctrl_address"], forged_decode),
               (workers["prefill"]["ctrl_address"], forged_prefill)]
    attacks = [(address, frames, kind) for kind in PEER_KINDS for address, frames in targets]
    with ThreadPoolExecutor(len(attacks)) as pool:  # every peer at once, each its own context
        list(pool.map(lambda a: send_as(*a, secret), attacks))
    thread.join(120)
    assert victim == [reference]
    with pytest.raises(TimeoutError):
        trap.accept()  # the prefill worker never dialled the attacker
    trap.close()
    _wait_counted(server, before, wanted)
    assert _rejected(server, 'reason="malformed"') == before['reason="malformed"']
    assert {r: w["pid"] for r, w in _workers(server).items()} == pids
    assert all(w["alive"] for w in _workers(server).values())
    _health_is_fast(server)
    assert server.wait_idle_blocks() == 0
    assert _complete(server) == reference


def _cache() -> PagedKvCache:
    cache = PagedKvCache.allocate(SPEC, 4)
    fill_random(cache, torch.Generator().manual_seed(0))
    return cache


def test_forged_kv_transfers_are_refused_with_no_leaked_blocks(
        deployment: tuple[Server, bytes]) -> None:
    server, secret = deployment
    decode = _workers(server)["decode"]
    kv = decode["kv_address"]
    refused = ('component="decode-0",plane="kv",reason="unauthenticated"',
               'component="proxy",plane="events",reason="unknown_request"',
               'component="decode-0",plane="kv",reason="unknown_reservation"')
    before = {labels: _rejected(server, labels) for labels in refused}
    with ThreadPoolExecutor(2) as pool:  # a DEALER without the deployment's key, both at once
        list(pool.map(lambda other: _send_kv(kv, other, "nobody", "", TransferTimeout,
                                             timeout_s=2.0), (generate_secret(), None)))
    _wait_counted(server, before, {refused[0]: 2})
    # The right key (a buggy or hijacked component): a forged reservation is aborted by the
    # proxy as soon as the decode worker reports it (the proxy holds no such request), so no
    # block stays pinned; KV for it (or any unknown request) is then refused, typed. A wrong
    # token on a live reservation is refused too (tests/unit/test_transfer_auth.py: bad_token).
    prompt = list(range(100, 140))
    reserve = dmsg.Reserve("forged-kv", prompt, SamplingParams(max_tokens=4), kv_token="a" * 32)
    send_as(decode["ctrl_address"], [dmsg.DECODE_CTRL.encode(reserve)], "right-key", secret)
    _wait_counted(server, before, {refused[1]: 1})
    _send_kv(kv, secret, "forged-kv", "b" * 32, UnexpectedTransfer)
    _send_kv(kv, secret, "not-reserved", "a" * 32, UnexpectedTransfer)
    _wait_counted(server, before, {refused[2]: 2})
    assert server.wait_idle_blocks() == 0
    assert _workers(server)["decode"]["pid"] == decode["pid"]
    _health_is_fast(server)


def _send_kv(address: str, secret: bytes | None, rid: str, token: str, error: type,
             timeout_s: float = 10.0) -> None:
    ctx = zmq.Context()
    ctx_auth = ClusterAuth(ctx, secret)
    tx = ZmqKvSender(address, ZmqSenderConfig(timeout_s=timeout_s), context=ctx,
                     security=ctx_auth)
    try:
        with pytest.raises(error):
            tx.send(_cache(), [0, 1, 2], 0, 40, request_id=rid, reservation_token=token)
    finally:
        tx.close()
        ctx_auth.close()
        ctx.term()


def test_a_raw_connection_to_the_stream_data_port_is_closed_and_counted(
        deployment: tuple[Server, bytes]) -> None:
    server, _ = deployment
    decode = _workers(server)["decode"]
    known = {port_of(decode["ctrl_address"]), port_of(decode["kv_address"])}
    data_ports = listening_ports(decode["pid"]) - known
    assert data_ports, "the decode worker has no stream data port"
    labels = 'component="decode-0",plane="kv_data",reason="unauthenticated"'
    before = _rejected(server, labels)
    for port in data_ports:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"\x00" * 16 + b"forged KV bytes" * 100)
            conn.settimeout(10)
            with contextlib.suppress(ConnectionResetError):  # reset: bytes left unread
                assert conn.recv(1) == b""
    _wait_metric(server, labels, before + len(data_ports))
    assert _workers(server)["decode"]["pid"] == decode["pid"]
