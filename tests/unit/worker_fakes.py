"""The fake proxy and the message factories of the worker handler tests
(test_worker_handlers.py, test_worker_handlers_pd.py).

A `FakeProxy` owns the proxy's ends, authenticated as the real proxy's are (a fresh cluster
secret per fake, which its workers' configs carry): a PULL socket bound on 127.0.0.1 port 0
that the workers' events go to (`WorkerConfig.events_address`), and PUSH sockets to each
worker's ctrl address.
`send` encodes a control message with the real codec, and hands what the worker's Inbox
decodes to `worker.on_ctrl`; `wait_event` calls the workers' `do_work` until the wanted event
arrives. The `proxy` and `make_worker` fixtures are in tests/unit/conftest.py.

Messages are built only by the factories at the top of this file.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

from engine.kv_spec import KvSpec
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from protocol import decode_ctrl as dmsg
from protocol import prefill_ctrl as pmsg
from protocol import worker_events as ev
from protocol.auth import ClusterAuth, generate_secret
from worker.base import WorkerBase
from worker.config import WorkerConfig

WAIT_S = 5.0
NUM_BLOCKS = 16  # tiny_engine with 64 KiB of KV; 8 tokens a block
KV_64K = "64KiB"
PROMPT = [(7 * i) % 500 + 10 for i in range(20)]  # 3 blocks


# ---- messages (the one place they are built) ----------------------------------------------------
def sampling(max_tokens: int = 4, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def kv_spec_of(worker: WorkerBase, **changes: Any) -> KvSpec:
    return worker.engine.plan.spec.with_(**changes)


def reserve(request_id: str, prompt: list[int] = PROMPT, params: SamplingParams | None = None,
            remote_prefill: bool = True, queue_timeout_s: float = 30.0) -> dmsg.Reserve:
    return dmsg.Reserve(request_id, list(prompt), params or sampling(), remote_prefill,
                        queue_timeout_s)


def prefill(request_id: str, decode_id: str, kv_address: str, block_ids: list[int],
            kv_spec: KvSpec, prompt: list[int] = PROMPT,
            params: SamplingParams | None = None) -> pmsg.Prefill:
    return pmsg.Prefill(request_id, list(prompt), params or sampling(), decode_id, kv_address,
                        list(block_ids), kv_spec)


# ---- the fake proxy -----------------------------------------------------------------------------
class FakeProxy:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.secret = generate_secret()
        self.auth = ClusterAuth(self.ctx, self.secret)
        self.events = self.ctx.socket(zmq.PULL)
        self.events.setsockopt(zmq.LINGER, 0)
        self.auth.server(self.events, "events")
        self.events.bind("tcp://127.0.0.1:0")
        self.address = self.events.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pending: list[Any] = []  # events received and not yet taken by a test
        self._ctrl: dict[str, zmq.Socket] = {}

    def config(self, worker_id: str, **kw: Any) -> WorkerConfig:
        return WorkerConfig(worker_id=worker_id, events_address=self.address,
                            cluster_secret=self.secret, **kw)

    def send(self, worker: WorkerBase, msg: object) -> None:
        """Over the wire to the worker's ctrl Inbox, then into its handler."""
        sock = self._ctrl.get(worker.worker_id)
        if sock is None:
            sock = self._ctrl[worker.worker_id] = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            self.auth.client(sock)
            sock.connect(worker.ctrl.address)
        sock.send(worker.ctrl.family.encode(msg))
        deadline = time.monotonic() + WAIT_S
        while not (got := worker.ctrl.drain()):
            assert time.monotonic() < deadline, f"{type(msg).__name__} did not reach the worker"
            time.sleep(0.002)
        assert got == [msg]
        worker.on_ctrl(got[0])

    def _receive(self, timeout_ms: int) -> None:
        if self.events.poll(timeout_ms):
            while True:
                try:
                    self.pending.append(ev.WORKER_EVENTS.decode(self.events.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    return

    def wait_event(self, cls: type, request_id: str | None = None,
                   drive: tuple[WorkerBase, ...] = (), timeout_s: float = WAIT_S) -> Any:
        """The first pending `cls` event (of `request_id`), running the workers' `do_work`
        while it has not come."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i, msg in enumerate(self.pending):
                if isinstance(msg, cls) and request_id in (None, msg.request_id):
                    return self.pending.pop(i)
            assert time.monotonic() < deadline, f"no {cls.__name__} in {self.pending}"
            for worker in drive:
                worker.do_work()
            self._receive(5)

    def assert_no_event(self, request_id: str, drive: tuple[WorkerBase, ...] = (),
                        for_s: float = 0.3) -> None:
        deadline = time.monotonic() + for_s
        while time.monotonic() < deadline:
            for worker in drive:
                worker.do_work()
            self._receive(5)
        assert not [m for m in self.pending if getattr(m, "request_id", None) == request_id]

    def stream(self, request_id: str, drive: tuple[WorkerBase, ...]) -> list[ev.Tokens]:
        """Tokens events of a request until the one with a finish reason."""
        out = [self.wait_event(ev.Tokens, request_id, drive)]
        while out[-1].finish_reason is None:
            out.append(self.wait_event(ev.Tokens, request_id, drive))
        return out

    def close(self) -> None:
        for sock in self._ctrl.values():
            sock.close(linger=0)
        self.events.close(linger=0)
        self.auth.close()
        self.ctx.term()


def assert_all_free(worker: WorkerBase) -> None:
    pool = worker.engine.cache.pool
    assert pool.num_used == 0 and pool.num_free == pool.num_blocks
    worker.engine.check_idle_integrity()


def closed_port_address() -> str:
    """A tcp address on 127.0.0.1 where nothing listens (a port bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def greedy_reference(tiny_engine: Callable[..., LLMEngine], params: SamplingParams) -> list[int]:
    return tiny_engine().generate([PROMPT], params)[0].output_ids
