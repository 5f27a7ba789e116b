"""What each step of a transfer's control path costs on the machine it runs on.

The NCCL transfer (#3) spends ~0.9 ms in Python before the first byte moves on the 2xH200
host, where every Python step measured 50-400 us against 10-50 us on a plain VM. That host
runs under gVisor, where a thread wake-up and many driver calls go through the sandbox. This
probe times the primitives one at a time, so that what leaves Python (or what busy-polling
saves) is chosen on numbers:

- host hops between two processes, one way (half the median ping-pong round trip of 16-byte
  messages): ZMQ DEALER->ROUTER with the receiver blocking in poll (how SIZES/HEADER travel
  now), the same busy-polling, and a Unix socket pair blocking / busy-polling;
- with CUDA: CPU time per call of what a transfer calls per buffer: CUDA event with/without
  timing (create + record), event query, stream wait_event, pinning the block ids, their H2D
  copy, a torch index_select launch, and a Triton block-gather launch
  (transfer/convert/block_copy.py).

    python -m bench.control_probe [--round-trips 2000] [--calls 500] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zmq

from bench.transfer import BLOCK, LLAMA3_8B, RESULTS, machine

MSG = b"x" * 16


def _zmq_echo(endpoint_q: Any, busy: bool, n: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    endpoint_q.put(f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}")
    for _ in range(n):
        if busy:
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                    break
                except zmq.Again:
                    pass
        else:
            frames = sock.recv_multipart()
        sock.send_multipart(frames)
    sock.close(linger=1000)
    ctx.term()


def _zmq_hop(busy: bool, n: int) -> float:
    q: Any = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_zmq_echo, args=(q, busy, n))
    proc.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(q.get(timeout=60))
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        sock.send(MSG)
        if busy:
            while True:
                try:
                    sock.recv(zmq.NOBLOCK)
                    break
                except zmq.Again:
                    pass
        else:
            sock.recv()
        rtts.append(time.perf_counter() - t0)
    proc.join(30)
    sock.close(linger=0)
    ctx.term()
    return statistics.median(rtts[n // 10:]) / 2 * 1e6


def _pair_echo(sock: socket.socket, busy: bool, n: int) -> None:
    sock.setblocking(not busy)
    for _ in range(n):
        while True:
            try:
                data = sock.recv(64)
                break
            except BlockingIOError:
                pass
        sock.sendall(data)


def _pair_hop(busy: bool, n: int) -> float:
    a, b = socket.socketpair()
    proc = mp.get_context("fork").Process(target=_pair_echo, args=(b, busy, n))
    proc.start()
    a.setblocking(not busy)
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        a.sendall(MSG)
        while True:
            try:
                a.recv(64)
                break
            except BlockingIOError:
                pass
        rtts.append(time.perf_counter() - t0)
    proc.join(30)
    a.close()
    b.close()
    return statistics.median(rtts[n // 10:]) / 2 * 1e6


def _per_call_us(fn: Callable[[], Any], calls: int) -> float:
    for _ in range(min(20, calls)):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _cuda_calls(calls: int) -> dict[str, float]:
    from engine.kv_spec import KvDtype, KvSpec
    from transfer.convert import block_copy
    from transfer.convert.cache import PagedKvCache
    from transfer.convert.pack import PackOptions, pack_kv

    dev = torch.device("cuda", 0)
    spec = KvSpec(**LLAMA3_8B, block_size=BLOCK, dtype=KvDtype.BFLOAT16)
    cache = PagedKvCache.allocate(spec, 512, device=dev)
    table = torch.randperm(512)[:256].tolist()  # 4k tokens
    stream = torch.cuda.Stream(dev)
    done = torch.cuda.Event()
    done.record()
    torch.cuda.synchronize()
    ids_host = torch.tensor(table)
    ids_pinned = ids_host.pin_memory()
    ids = ids_pinned.to(dev)
    packed = pack_kv(cache, table, 0, 256 * BLOCK, transfer_id=1, transport="nccl",
                     request_id="probe",
                     options=PackOptions(allow_views=False, chunk_bytes=16 << 20, taper=False))
    entries = packed.header.entries_by_buffer()[0]  # one layer group of 16 MiB
    out = torch.empty(packed.header.buffer_sizes[0], dtype=torch.uint8, device=dev)
    layer0 = cache.parts(0)["k"] if "k" in cache.parts(0) else next(iter(cache.parts(0).values()))

    def timed_event() -> None:
        torch.cuda.Event(enable_timing=True).record(stream)

    def plain_event() -> None:
        torch.cuda.Event().record(stream)

    result = {
        "event_timing_create_record": _per_call_us(timed_event, calls),
        "event_plain_create_record": _per_call_us(plain_event, calls),
        "event_query_done": _per_call_us(done.query, calls),
        "stream_wait_event": _per_call_us(lambda: stream.wait_event(done), calls),
        "pin_memory_256_ids": _per_call_us(lambda: ids_host.pin_memory(), calls),
        "h2d_copy_256_ids_pinned": _per_call_us(
            lambda: ids_pinned.to(dev, non_blocking=True), calls),
        "index_select_launch_1_layer_part": _per_call_us(
            lambda: layer0.index_select(0, ids), calls),
    }
    if block_copy.is_available(dev):
        result["triton_gather_launch_16mib"] = _per_call_us(
            lambda: block_copy.gather_entries(cache, ids, entries, out), calls)
    torch.cuda.synchronize()
    return {k: round(v, 1) for k, v in result.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--round-trips", type=int, default=2000)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--out", type=Path, default=RESULTS / "control_probe.json")
    args = ap.parse_args()
    n = args.round_trips
    hops = {"zmq_blocking_poll": _zmq_hop(False, n), "zmq_busy_poll": _zmq_hop(True, n),
            "unix_socketpair_blocking": _pair_hop(False, n),
            "unix_socketpair_busy_poll": _pair_hop(True, n)}
    result: dict[str, Any] = {"benchmark": "control_probe", "machine": machine(),
                              "one_way_hop_us": {k: round(v, 1) for k, v in hops.items()},
                              "statistic": "median"}
    if torch.cuda.is_available():
        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
        result["cuda_cpu_us_per_call"] = _cuda_calls(args.calls)
    for group in ("one_way_hop_us", "cuda_cpu_us_per_call"):
        for k, v in result.get(group, {}).items():
            print(f"{group:>22} {k:<36} {v:8.1f} us")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
