"""The worker's guards (worker/base.py) on a real decode worker with a tiny engine: a message
whose fields are out of bounds fails its request alone, typed and naming the field; an engine
step that raises fails the requests it held, not the process; Hello is repeated."""

from __future__ import annotations

import threading
import time
from typing import Any

import msgpack
import pytest
import zmq
from worker_fakes import PROMPT, WAIT_S, FakeProxy, assert_all_free, reserve, sampling

from decode.worker import DecodeWorker
from protocol import worker_events as ev
from protocol.errors import ErrorCode
from protocol.rejections import Plane

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 49152  # the tiny checkpoints' (tests/conftest.py)


def push_frame(proxy: FakeProxy, worker: DecodeWorker, frame: bytes) -> None:
    sock = proxy.ctx.socket(zmq.PUSH)
    sock.connect(worker.ctrl.address)
    sock.send(frame)
    sock.close(linger=1000)
    for _ in range(500):
        if worker.ctrl.socket.poll(10):
            break
    assert worker.ctrl.drain() == []


@pytest.mark.parametrize(("prompt", "params", "field"), [
    ([1, VOCAB, 3], {}, "Reserve.prompt_ids: 49152 is not below vocab_size 49152"),
    ([1, 2, 3], {"stop_token_ids": (VOCAB + 7,)}, "Reserve.params.stop_token_ids"),
    ([5] * 5000, {}, "Reserve.prompt_ids: length 5000 exceeds max_model_len 64"),
    ([1, 2, 3], {"max_tokens": 10_000}, "Reserve.params.max_tokens: 10000 is above"),
    ([1, 2, 3], {"logit_bias": [[VOCAB, 5.0]]},
     "Reserve.params.logit_bias: key 49152 is not below vocab_size"),
])
def test_an_out_of_bounds_message_fails_its_request_alone_naming_the_field(
        proxy: FakeProxy, make_worker: Any, prompt: list[int], params: dict, field: str) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    raw = msgpack.unpackb(d.ctrl.family.encode(reserve("evil", PROMPT, sampling())))
    raw["d"]["prompt_ids"] = prompt
    raw["d"]["params"].update({k: list(v) if isinstance(v, tuple) else v
                               for k, v in params.items()})
    push_frame(proxy, d, msgpack.packb(raw))  # forged: the codec would not encode it
    got = proxy.wait_event(ev.RequestFailed, "evil")
    assert got.code is ErrorCode.INVALID_REQUEST and field in got.error, got.error
    assert d.rejections.count(Plane.CONTROL, "malformed") == 1
    proxy.send(d, reserve("good", PROMPT, remote_prefill=False))  # the worker serves on
    assert proxy.stream("good", drive=(d,))[-1].finish_reason is not None
    assert_all_free(d)


def test_an_engine_step_that_raises_fails_its_requests_not_the_process(
        proxy: FakeProxy, make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    real = d.engine.runner.execute
    calls = {"n": 0}

    def failing(batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected step failure")
        return real(batch)

    d.engine.runner.execute = failing  # type: ignore[method-assign]
    proxy.send(d, reserve("victim", PROMPT, sampling(max_tokens=20), remote_prefill=False))
    for _ in range(5):
        d.guarded(d.do_work)
    got = proxy.wait_event(ev.RequestFailed, "victim")
    assert got.code is ErrorCode.INTERNAL and "injected step failure" in got.error
    assert d.rejections.count(Plane.CONTROL, "step_error") == 1
    assert not d.local and not d.engine.has_unfinished
    assert_all_free(d)
    proxy.send(d, reserve("next", PROMPT, remote_prefill=False))
    assert proxy.stream("next", drive=(d,))[-1].finish_reason is not None


def test_hello_is_repeated_with_the_heartbeats(proxy: FakeProxy, make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0", heartbeat_interval_s=0.05,
                                               hello_interval_s=0.1))
    beats = threading.Thread(target=d._heartbeats, daemon=True)
    beats.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while sum(isinstance(m, ev.Hello) for m in proxy.pending) < 2:
            assert time.monotonic() < deadline, "Hello was not repeated"
            proxy._receive(10)
        hellos = [m for m in proxy.pending if isinstance(m, ev.Hello)]
        assert hellos[0] == hellos[1] == d.hello()
        heartbeats = [m for m in proxy.pending if isinstance(m, ev.Heartbeat)]
        assert heartbeats and heartbeats[0].pid == d.hello().pid
    finally:
        d.stopping = True
        beats.join(5)
