"""NCCL transport between two GPUs of one host (two spawned processes, one per GPU).

Skips cleanly without 2 CUDA devices or without libnccl. Covers: scattered paged blocks on
GPU 0 → scattered paged blocks of a different layout/dtype/block size on GPU 1, acked; a
second transfer on the same link; a refused header (no reservation) while the eager sender's
sends wait on the GPU: typed remote error, link aborted and rebuilt, the next transfer lands;
announced sizes (SIZES) that differ from the header: typed error, link dropped and rebuilt;
and the watchdog: a receiver that never posts its receive makes the sender fail with
TransferTimeout (communicator aborted) instead of hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from typing import Any

import pytest
import torch

from engine.kv_spec import KvDtype, KvLayout, KvSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

SRC = KvSpec(4, 8, 128, 16, dtype=KvDtype.BFLOAT16)
DST = KvSpec(4, 8, 128, 32, dtype=KvDtype.FLOAT16, layout=KvLayout.HND)
SRC_TABLE = [17, 3, 40, 8, 22, 9, 31, 1, 12, 50]  # 160 tokens of 16
DST_TABLE = [4, 30, 11, 2, 19]  # in blocks of 32
TOK = (0, 150)


def _nccl_found() -> bool:
    from transfer.nccl.lib import NcclLibrary
    from transfer.wire.errors import TransportUnavailable
    try:
        NcclLibrary()
        return True
    except TransportUnavailable:
        return False


def _receiver(endpoints: Any, results: Any, stall: bool, refuse_first: bool) -> None:
    from transfer.convert.cache import PagedKvCache
    from transfer.convert.local import read_tokens_float
    from transfer.endpoint.receiver import ZmqKvReceiver, ZmqReceiverConfig
    from transfer.nccl.transport import NcclReceiverPlugin
    from transfer.wire import framing as proto

    class StallingPlugin(NcclReceiverPlugin):
        """Ignores SIZES and the header's pre-post, says READY, then never posts the receive."""

        def post_sizes(self, peer, rest):  # type: ignore[override]
            return None

        def prepare(self, peer, header):  # type: ignore[override]
            return None

        def receive(self, transfer, deadline):  # type: ignore[override]
            self.links[transfer.peer].wait_ready(deadline)
            ready = [proto.READY, proto.pack([transfer.header.transfer_id])]
            self.desk.reply(transfer.peer, ready)
            self.desk.flush()
            time.sleep(8)
            raise TimeoutError("stalled on purpose")

    torch.cuda.set_device(1)
    dst = PagedKvCache.allocate(DST, 64, device="cuda:1")
    ended: dict[str, Any] = {}
    plugin = (StallingPlugin if stall else NcclReceiverPlugin)("cuda:1")
    rx = ZmqKvReceiver(dst, ZmqReceiverConfig(idle_timeout_s=20), nccl=plugin,
                       on_complete=lambda r, reps: ended.__setitem__(r, reps),
                       on_release=lambda r, e: ended.__setitem__(r, e))
    for rid in ("second",) if refuse_first else ("first", "second"):
        rx.expect(rid, DST_TABLE)
    endpoints.put(rx.endpoint)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(ended) < (1 if stall or refuse_first else 2):
        rx.poll(0.01)
    # numpy, not tensors: a tensor in a Queue travels as a file descriptor that the parent can
    # only fetch while this process is alive (EOFError in the parent once it has exited)
    got = [t.float().cpu().numpy() for t in read_tokens_float(dst, DST_TABLE, *TOK)]
    results.put(("receiver", {k: type(v).__name__ for k, v in ended.items()}, got))
    rx.close()


def _sender(endpoint: str, results: Any, timeout_s: float, blocking: bool,
            lie_sizes: bool = False) -> None:
    from bench.kv_fill import fill_random
    from transfer.convert.cache import PagedKvCache
    from transfer.convert.local import read_tokens_float
    from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
    from transfer.nccl.transport import NcclSenderPlugin
    from transfer.wire.errors import TransferError

    torch.cuda.set_device(0)
    src = PagedKvCache.allocate(SRC, 64, device="cuda:0")
    fill_random(src, torch.Generator().manual_seed(0))
    tx = ZmqKvSender(endpoint, ZmqSenderConfig(timeout_s=timeout_s),
                     nccl=NcclSenderPlugin("cuda:0", blocking=blocking))
    if lie_sizes:  # the first transfer announces one buffer 16 bytes larger than its header says
        import msgpack

        from transfer.wire import framing as proto
        channel = tx._channel
        real_send = channel.send_frames
        lied: list[bool] = []

        def send_frames(frames: list[Any], deadline: float, **k: Any) -> Any:
            if frames[0] == proto.SIZES and not lied:
                lied.append(True)
                tid, sizes = msgpack.unpackb(frames[1])
                frames = [proto.SIZES, proto.pack([tid, [sizes[0] + 16, *sizes[1:]]])]
            return real_send(frames, deadline, **k)

        channel.send_frames = send_frames  # type: ignore[method-assign]
    outcome: list[Any] = []
    for rid in ("first", "second"):
        t0 = time.monotonic()
        try:
            res = tx.send(src, SRC_TABLE, *TOK, request_id=rid)
            outcome.append(("ok", res.report["path"], res.num_bytes))
        except TransferError as e:
            outcome.append(("error", type(e).__name__, time.monotonic() - t0))
            if not e.is_remote:
                break
    want = [t.float().cpu().numpy() for t in read_tokens_float(src, SRC_TABLE, *TOK)]
    results.put(("sender", outcome, want))
    tx.close()


def _run(stall: bool, timeout_s: float, refuse_first: bool = False, blocking: bool = True,
         lie_sizes: bool = False) -> dict[str, tuple]:
    if not _nccl_found():
        pytest.skip("libnccl.so.2 not found (pip install 'pdserve[gpu]')")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ctx = mp.get_context("spawn")
    endpoints, results = ctx.Queue(), ctx.Queue()
    rx = ctx.Process(target=_receiver, args=(endpoints, results, stall, refuse_first))
    rx.start()
    tx = ctx.Process(target=_sender, args=(endpoints.get(timeout=120), results, timeout_s,
                                           blocking, lie_sizes))
    tx.start()
    out: dict[str, tuple] = {}
    try:
        while len(out) < 2:
            item = results.get(timeout=180)
            out[item[0]] = item[1:]
    except queue.Empty:
        pass
    finally:
        for p in (tx, rx):
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking-comm", "nonblocking-comm"])
def test_nccl_scattered_blocks_between_two_gpus(blocking: bool) -> None:
    out = _run(stall=False, timeout_s=60, blocking=blocking)
    outcome, want = out["sender"]
    ended, got = out["receiver"]
    assert [o[0] for o in outcome] == ["ok", "ok"], outcome
    assert outcome[0][1] == "convert" and outcome[0][2] == 10 * SRC.bytes_per_block
    assert ended == {"first": "list", "second": "list"}
    for g, w in zip(got, want, strict=True):  # bf16 -> fp16 within fp16's tolerance
        assert torch.allclose(torch.from_numpy(g), torch.from_numpy(w), rtol=2**-10, atol=2**-24)


def test_nccl_watchdog_turns_a_stalled_peer_into_timeout() -> None:
    out = _run(stall=True, timeout_s=3)
    assert "sender" in out, f"the sender process sent no result: {out.keys()}"
    outcome, _ = out["sender"]
    assert outcome[0][0] == "error" and outcome[0][1] == "TransferTimeout", outcome
    assert outcome[0][2] < 15  # failed near its deadline, did not hang


@pytest.mark.parametrize(("lie_sizes", "error"),
                         [(False, "UnexpectedTransfer"), (True, "MalformedHeader")],
                         ids=["refused-header", "announced-sizes-differ"])
def test_nccl_failed_first_transfer_then_the_next_lands(lie_sizes: bool, error: str) -> None:
    """A refused header (no reservation) while the eager sends wait on the GPU: the payload is
    taken and dropped, the link stays. Announced sizes that differ from the header: the receiver
    drops the link (`link_dropped`) and the sender builds a new one. Either way the error is
    typed and the next transfer lands."""
    out = _run(stall=False, timeout_s=30, refuse_first=True, lie_sizes=lie_sizes)
    outcome, want = out["sender"]
    ended, got = out["receiver"]
    assert outcome[0][:2] == ("error", error) and outcome[0][2] < 10, outcome
    assert outcome[1][0] == "ok", outcome
    assert ended == {"second": "list"}
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(torch.from_numpy(g), torch.from_numpy(w), rtol=2**-10, atol=2**-24)
