"""Messages that crashed or froze a component (issue #14): replayed with a plain ZMQ socket
(tests/security/attacker.py) against a real colocated deployment. Each must be harmless: the
worker keeps its pid, other clients' streams are unchanged, blocks return to zero, /health
stays fast, the refusal is counted in `pdserve:rejected_messages_total`. Frames that do not
decode at all, from an insider and from a peer without the secret, are counted the same way.

One deployment serves the whole module (starting one costs tens of seconds on a small CPU);
the tests run in file order, the worker's restart last.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import attacker
import httpx
import pytest
from attacks import secret_file, send_as
from serving import NO_WARMUP, Server, serve, sse_events

from engine.kv_spec import KvDtype, KvSpec
from protocol import worker_events as ev

VOCAB = 49152  # SmolLM2
MAX_MODEL_LEN = 2048  # serving.serve's --max-model-len
VICTIM = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0.0,
          "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A deployment whose secret the attacker holds (an insider: auth is not what is tested)."""
    path, secret = secret_file(tmp_path_factory.mktemp("secret"))
    with serve("--colocated", "--decode", "1", "--max-restarts", "1", *NO_WARMUP,
               "--cluster-secret-file", str(path)) as s:
        s.secret = secret
        yield s


def decode_worker(server: Server) -> dict:
    with server.client() as c:
        return next(w for w in c.get("/status").json()["workers"] if w["role"] == "decode")


def refused(server: Server, component: str, plane: str, reason: str) -> float:
    return server.metric("pdserve:rejected_messages_total",
                         f'component="{component}",plane="{plane}",reason="{reason}"')


def wait_for(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@dataclass
class Stream:
    """A victim's streamed completion, read on a thread."""

    server: Server
    body: dict
    text: list[str] = field(default_factory=list)
    error: dict | None = None
    ended_at: float = 0.0
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        with self.server.client() as c, \
                c.stream("POST", "/v1/completions", json={**self.body, "stream": True}) as r:
            for event in sse_events(r):
                if isinstance(event, dict) and "error" in event:
                    self.error = event["error"]
                elif isinstance(event, dict):
                    self.text.append(event["choices"][0]["text"])
        self.ended_at = time.monotonic()

    def join(self, timeout_s: float = 120.0) -> str:
        assert self.thread is not None
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the victim's stream never ended"
        return "".join(self.text)


def reference(server: Server) -> str:
    with server.client() as c:
        r = c.post("/v1/completions", json=VICTIM)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# ---- the attacks --------------------------------------------------------------------------------
def test_crashing_reserves_fail_alone_and_are_counted(server: Server) -> None:
    """Non-int stop token ids, prompt ids >= the vocabulary (or 2**64 - 1), a prompt 5000
    tokens long (> --max-model-len): each refused by the codec, naming the field; the victim's
    stream is the same as without them."""
    expected = reference(server)
    worker = decode_worker(server)
    before = refused(server, worker["worker_id"], "control", "malformed")
    victim = Stream(server, VICTIM).start()
    frames = [attacker.reserve("evil-1", [1, 2, 3], stop_token_ids=["x"]),
              attacker.reserve("evil-2", [1, 2, 3], stop_token_ids=[1.5]),
              attacker.reserve("evil-3", [1, 2, 3], stop_token_ids=[VOCAB]),
              attacker.reserve("evil-4", [1, VOCAB, 3]),
              attacker.reserve("evil-5", [1, 2**64 - 1, 3]),
              attacker.reserve("evil-6", [-1, 2, 3]),
              attacker.reserve("evil-7", [5] * (MAX_MODEL_LEN + 5000))]
    attacker.push(worker["ctrl_address"], frames, server.secret)
    assert victim.join() == expected and victim.error is None
    wait_for(lambda: refused(server, worker["worker_id"], "control", "malformed")
             >= before + len(frames), 20, "the refusals never reached /metrics")
    assert decode_worker(server)["pid"] == worker["pid"]
    assert server.wait_idle_blocks() == 0
    assert not [line for line in server.log if "Traceback" in line]


def test_undecodable_frames_are_counted_and_the_worker_keeps_serving(server: Server) -> None:
    """Frames that do not decode are dropped, counted by plane and reason, and harm nobody; the
    same garbage from a peer without the deployment's secret never even reaches the decoder."""
    worker = decode_worker(server)
    before = {reason: refused(server, worker["worker_id"], "control", reason)
              for reason in ("malformed", "unauthenticated")}
    garbage = [b"\x00not msgpack", b"\x92\x01\x02", b"\x81\xa4type\xa5Bogus"]
    send_as(worker["ctrl_address"], garbage, "right-key", server.secret)  # a holder of the secret
    send_as(worker["ctrl_address"], garbage, "plain")  # anyone else
    wait_for(lambda: refused(server, worker["worker_id"], "control", "malformed")
             >= before["malformed"] + len(garbage)
             and refused(server, worker["worker_id"], "control", "unauthenticated")
             >= before["unauthenticated"] + 1, 20, "the worker's rejections never reached /metrics")
    assert refused(server, worker["worker_id"], "control", "malformed") \
        == before["malformed"] + len(garbage)
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert decode_worker(server)["pid"] == worker["pid"]


def test_forged_reserve_pins_no_blocks(server: Server) -> None:
    """A valid-looking Reserve nobody asked for: the worker reserves, tells the proxy, and the
    proxy (which holds no such request) has it free the blocks at once, not after 60 s."""
    worker = decode_worker(server)
    t0 = time.monotonic()
    attacker.push(worker["ctrl_address"], [attacker.reserve("forged", [7] * 2000)],
                  server.secret)
    wait_for(lambda: refused(server, "proxy", "events", "unknown_request") >= 1, 20,
             "the proxy never heard of the forged reservation")
    assert server.wait_idle_blocks(timeout_s=20) == 0
    assert time.monotonic() - t0 < 25  # the worker's own KV timeout is 60 s


def _health_latencies(server: Server, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            c.get("/health")
            out.append(time.monotonic() - t0)
            time.sleep(0.02)


def test_msgpack_bomb_costs_nobody(server: Server) -> None:
    """16 MiB of empty msgpack arrays (~1 GB once decoded) to the worker's ctrl socket and to
    the proxy's event socket: both drop it unread (ZMQ_MAXMSGSIZE); /health answers in < 1 s
    meanwhile and the worker keeps its pid."""
    worker = decode_worker(server)
    latencies: list[float] = []
    stop = threading.Event()
    poller = threading.Thread(target=_health_latencies, args=(server, stop, latencies))
    poller.start()
    try:
        time.sleep(0.5)
        events = attacker.events_address_of(worker["pid"])
        for _ in range(3):
            attacker.push(worker["ctrl_address"], [attacker.bomb()], server.secret, linger_ms=1000)
            attacker.push(events, [attacker.bomb()], server.secret, linger_ms=1000)
        time.sleep(2.0)
    finally:
        stop.set()
        poller.join(30)
    assert latencies and max(latencies) < 1.0, f"/health took up to {max(latencies):.2f} s"
    with server.client() as c:
        assert c.post("/v1/completions", json={**VICTIM, "max_tokens": 2}).status_code == 200
        assert c.get("/status").json()["workers"][0]["alive"]
    assert decode_worker(server)["pid"] == worker["pid"]


def _hello(worker_id: str, ctrl_address: str, pid: int) -> ev.Hello:
    return ev.Hello(worker_id, "decode", ctrl_address, ctrl_address,
                    KvSpec(30, 3, 64, 16, dtype=KvDtype.FLOAT32), "forged", pid, "evil")


def test_hello_reusing_a_live_worker_id_replaces_nothing(server: Server) -> None:
    """A Hello under `decode-0` with an invalid role (refused by the codec) or from another
    process (refused by the registry): the real worker stays registered and serving."""
    worker = decode_worker(server)
    events = attacker.events_address_of(worker["pid"])
    evil = ev.WORKER_EVENTS.encode(_hello(worker["worker_id"], "tcp://127.0.0.1:9", 4242))
    bad_role = evil.replace(b"\xa6decode", b"\xa6rogue!", 1)
    assert bad_role != evil
    before = refused(server, "proxy", "events", "malformed")
    attacker.push(events, [bad_role, evil], server.secret)
    wait_for(lambda: refused(server, "proxy", "events", "hello_conflict") >= 1, 20,
             "the conflicting Hello was not counted")
    assert refused(server, "proxy", "events", "malformed") >= before + 1
    now = decode_worker(server)
    assert (now["pid"], now["ctrl_address"], now["alive"]) == \
        (worker["pid"], worker["ctrl_address"], True)
    assert reference(server)


def test_abort_all_reaches_the_clients_at_once(server: Server) -> None:
    """AbortAll on the worker (a forged one, or a proxy restart): every request it drops is
    reported, so its client gets an error in a second or two, not after a 35-60 s timeout."""
    worker = decode_worker(server)
    victim = Stream(server, {**VICTIM, "max_tokens": 2000}).start()
    wait_for(lambda: victim.text, 60, "the victim's stream never started")
    t0 = time.monotonic()
    attacker.push(worker["ctrl_address"], [attacker.forge("AbortAll", {"reason": "forged"})],
                  server.secret)
    victim.join(30)
    assert victim.error is not None and victim.error.get("code") == "aborted", victim.error
    assert victim.ended_at - t0 < 2.0, f"the client waited {victim.ended_at - t0:.1f} s"
    assert server.wait_idle_blocks() == 0


def test_a_killed_worker_is_restarted_and_serves_again(server: Server) -> None:
    """The local launcher reaps a dead worker and starts it again (--max-restarts); the proxy
    registers the new process once the old one is declared dead."""
    worker = decode_worker(server)
    os.kill(worker["pid"], signal.SIGKILL)

    def restarted() -> bool:
        now = decode_worker(server)
        return now["pid"] != worker["pid"] and now["alive"]
    wait_for(restarted, 240, "the killed worker was not restarted")
    assert reference(server)
    with open(f"/proc/{worker['pid']}/stat") if os.path.exists(f"/proc/{worker['pid']}")  \
            else open(os.devnull) as f:
        assert " Z " not in f.read()  # reaped, no zombie
