"""The NCCL half of bench/transfer.py (`python bench/transfer.py --nccl`, needs 2 GPUs).

Llama-3-8B-shaped KV (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB per token), scattered
paged blocks on GPU 0 → scattered paged blocks on GPU 1 through transfer/nccl/transport.py,
beside torch.distributed NCCL send/recv of one contiguous buffer of the same size, each
repetition of both back to back. Two spawned ranks; each side's breakdown and the two sides'
marks on one timeline come from a `TimelineTracer` (bench/timeline.py) handed to the plugins.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import threading
import time

import torch

from bench.kv_fill import fill_random
from bench.transfer import BLOCK, LLAMA3_8B, machine
from engine.kv_spec import KvDtype, KvSpec
from transfer.convert.cache import PagedKvCache


def _median_breakdown(samples: list[dict]) -> dict:
    keys = {k for d in samples for k, v in d.items() if isinstance(v, (int, float))}
    return {k: round(statistics.median(d[k] for d in samples if d.get(k) is not None), 3)
            for k in sorted(keys)}


def _nccl_rank(rank: int, args: argparse.Namespace, endpoint_q, result_q) -> None:
    import torch.distributed as dist

    from bench.timeline import TimelineTracer
    from transfer.endpoint.receiver import ZmqKvReceiver, ZmqReceiverConfig
    from transfer.endpoint.sender import ZmqKvSender
    from transfer.nccl.transport import NcclReceiverPlugin, NcclSenderPlugin

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    tokens = args.tokens[0]
    spec = KvSpec(**LLAMA3_8B, block_size=BLOCK, dtype=KvDtype.BFLOAT16)
    num_blocks = 4 * tokens // BLOCK
    cache = PagedKvCache.allocate(spec, num_blocks, device=dev)
    dist.init_process_group("nccl", init_method=args.dist_url, rank=rank, world_size=2)
    tracer = TimelineTracer()
    side: _NcclSide
    if rank == 1:
        side = _NcclReceiverSide(cache, spec, tokens, tracer)
        plugin = NcclReceiverPlugin(dev, tracer=tracer)
        side.rx = ZmqKvReceiver(cache, ZmqReceiverConfig(endpoint="tcp://127.0.0.1:0"),
                                on_complete=side.end, on_release=side.end, nccl=plugin)
        endpoint_q.put(side.rx.endpoint)
        side.rx.start()
    else:
        fill_random(cache, torch.Generator(device="cpu").manual_seed(7))
        side = _NcclSenderSide(cache, tokens, tracer)
        side.plugin = NcclSenderPlugin(dev, tracer=tracer)
        side.tx = ZmqKvSender(endpoint_q.get(), nccl=side.plugin)
    plan = ([("eager", c) for c in args.chunk_mib] + [("ready", c) for c in args.ready_chunk_mib]
            + [("eager-nonblocking", c) for c in args.nonblocking_chunk_mib])
    rows = [side.measure(dist, mode, chunk_mib, args.repeats) for mode, chunk_mib in plan]
    dist.barrier()
    result_q.put(side.close(rows))
    dist.destroy_process_group()


class _NcclSide:
    """One rank of the NCCL benchmark: per repetition, torch.distributed send/recv of one
    contiguous buffer, then one pdserve transfer of scattered blocks (header over ZMQ, ack)."""

    def __init__(self, cache: PagedKvCache, tokens: int, tracer) -> None:
        self.cache, self.tokens, self.tracer = cache, tokens, tracer
        self.num_blocks = cache.num_blocks
        self.gen = torch.Generator().manual_seed(cache.device.index or 0)
        self.flat = torch.empty(tokens * cache.spec.bytes_per_token, dtype=torch.uint8,
                                device=cache.device)

    def baseline(self, dist, rank: int) -> float:
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(self.flat, 1)
        else:
            dist.recv(self.flat, 0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def table(self, gen: torch.Generator) -> list[int]:
        return torch.randperm(self.num_blocks, generator=gen)[:self.tokens // BLOCK].tolist()


class _NcclSenderSide(_NcclSide):
    def measure(self, dist, mode: str, chunk_mib: int, repeats: int) -> dict:
        times: dict[str, list[float]] = {"torch_nccl": [], "pdserve_nccl": []}
        breakdown: list[dict] = []
        marks: list[dict] = []  # absolute perf_counter marks per repetition (one clock, 2 ranks)
        self.plugin.chunk_bytes = chunk_mib << 20
        eager, blocking = mode != "ready", mode != "eager-nonblocking"
        if (self.plugin.eager, self.plugin.blocking) != (eager, blocking):  # a new link says so
            self.plugin.eager, self.plugin.blocking = eager, blocking
            self.plugin.reset()
        for rep in range(repeats + 3):
            seconds = self.baseline(dist, 0)
            rid = f"nccl-{mode}-{chunk_mib}-{rep}"
            dist.barrier()
            table = self.table(self.gen)
            self.tracer.clear()
            t0 = time.perf_counter()
            res = self.tx.send(self.cache, table, 0, self.tokens, request_id=rid)
            wall = time.perf_counter() - t0
            if rep >= 3:
                t = self.tracer.sender_ms()
                t["total_ms"] = wall * 1e3
                t["outside_payload_ms"] = wall * 1e3 - (t["cpu_sent_ms"] or 0.0)  # pack, ack wait
                times["torch_nccl"].append(seconds)
                times["pdserve_nccl"].append(res.seconds)
                breakdown.append(t)
                marks.append({"send_called": t0, **self.tracer.marks, "send_returned": t0 + wall})
        nbytes = self.flat.numel()
        gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
        return {"tokens": self.tokens, "bytes": nbytes, "mode": mode, "chunk_mib": chunk_mib,
                **{f"{k}_gbps": round(v, 2) for k, v in gbps.items()},
                "ratio": round(gbps["pdserve_nccl"] / gbps["torch_nccl"], 3),
                "sender_ms": _median_breakdown(breakdown), "_marks": marks}

    def close(self, rows: list[dict]) -> tuple:
        self.tx.close()
        return ("sender", rows)


class _NcclReceiverSide(_NcclSide):
    def __init__(self, cache: PagedKvCache, spec: KvSpec, tokens: int, tracer) -> None:
        super().__init__(cache, tokens, tracer)
        self.src_gen = torch.Generator().manual_seed(0)  # replays rank 0's tables to verify
        self.ref = PagedKvCache.allocate(spec, self.num_blocks, device=cache.device)
        fill_random(self.ref, torch.Generator(device="cpu").manual_seed(7))  # the sender's
        self.done: dict[str, object] = {}
        self.ack_marks: dict[str, float] = {}
        self.ended = threading.Condition()
        self.bad: list[str] = []

    def end(self, rid: str, outcome: object) -> None:  # on the receiver's thread
        self.ack_marks[rid] = time.perf_counter()  # the ack went out just before this callback
        with self.ended:
            self.done[rid] = outcome
            self.ended.notify_all()

    def measure(self, dist, mode: str, chunk_mib: int, repeats: int) -> dict:
        breakdown: list[dict] = []
        marks: list[dict] = []
        for rep in range(repeats + 3):
            self.baseline(dist, 1)
            rid = f"nccl-{mode}-{chunk_mib}-{rep}"
            dst_table, src_table = self.table(self.gen), self.table(self.src_gen)
            self.tracer.clear()
            self.rx.expect(rid, dst_table)
            dist.barrier()
            with self.ended:  # sleeps without taking the GIL from the receiver's thread
                self.ended.wait_for(lambda rid=rid: rid in self.done, timeout=120)
            reports = self.done.get(rid)
            if not isinstance(reports, list):
                raise SystemExit(f"transfer {rid} failed on the receiver: {reports!r}")
            if rep >= 3:
                breakdown.append(self.tracer.receiver_ms())
                marks.append({**self.tracer.marks, "ack_sent": self.ack_marks[rid]})
            if rep == 0:  # bit-exact check of a few layers
                self.check(src_table, dst_table, chunk_mib)
        return {"mode": mode, "chunk_mib": chunk_mib, "receiver_ms": _median_breakdown(breakdown),
                "_marks": marks}

    def check(self, src_table: list[int], dst_table: list[int], chunk_mib: int) -> None:
        dev, spec = self.cache.device, self.cache.spec
        src_ids, dst_ids = torch.tensor(src_table, device=dev), torch.tensor(dst_table, device=dev)
        for layer in (0, spec.num_layers // 2, spec.num_layers - 1):
            for part, t in self.cache.parts(layer).items():
                if not torch.equal(t[dst_ids], self.ref.parts(layer)[part][src_ids]):
                    self.bad.append(f"chunk {chunk_mib} MiB layer {layer} part {part}")

    def close(self, rows: list[dict]) -> tuple:
        self.rx.close()
        return ("receiver", rows, self.bad)


def _timeline(sender: list[dict], receiver: list[dict]) -> dict:
    """Median time of every mark since `send` was called (both ranks use one monotonic clock):
    sender marks as `tx_*`, receiver marks as `rx_*`, in the order they happen."""
    spans: dict[str, list[float]] = {}
    for s, r in zip(sender, receiver, strict=True):
        t0 = s["send_called"]
        for prefix, marks in (("tx_", s), ("rx_", r)):
            for k, v in marks.items():
                spans.setdefault(prefix + k, []).append((v - t0) * 1e3)
    med = {k: round(statistics.median(v), 3) for k, v in spans.items()}
    return dict(sorted(med.items(), key=lambda kv: kv[1]))


def run_nccl(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        raise SystemExit("--nccl needs 2 CUDA GPUs on this host")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on shared hosts
    ctx = mp.get_context("spawn")
    endpoint_q, result_q = ctx.Queue(), ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        args.dist_url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    procs = [ctx.Process(target=_nccl_rank, args=(r, args, endpoint_q, result_q)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(2):
        item = result_q.get(timeout=600)
        got[item[0]] = item[1:]
    for p in procs:
        p.join(timeout=60)
    rows = got["sender"][0]
    recv_rows, bad = got["receiver"]
    for row, rrow in zip(rows, recv_rows, strict=True):
        row["receiver_ms"] = rrow["receiver_ms"]
        row["timeline_ms"] = _timeline(row.pop("_marks"), rrow.pop("_marks"))
        print(f"{row['tokens']} tokens {row['bytes'] / 2**20:.0f} MiB {row['mode']} chunk "
              f"{row['chunk_mib']} MiB | "
              f"torch.distributed send/recv {row['torch_nccl_gbps']:.1f} GB/s | pdserve NCCL "
              f"{row['pdserve_nccl_gbps']:.1f} GB/s | ratio {row['ratio']:.2f} (target >= 0.85)")
        print(f"   sender ms:   {row['sender_ms']}")
        print(f"   receiver ms: {row['receiver_ms']}")
        print(f"   timeline ms: {row['timeline_ms']}")
    print("data check:", "OK (bit-exact)" if not bad else f"MISMATCH {bad}")
    props = torch.cuda.get_device_properties(0)
    return {"benchmark": "transfer_nccl",
            "model": "Llama-3-8B KV (32 layers, 8 kv heads, dim 128, bf16)",
            "block_size": BLOCK, "repeats": args.repeats, "statistic": "median",
            "machine": {**machine(), "gpu": props.name, "gpus": torch.cuda.device_count()},
            "data_check": bad or "ok",
            "breakdown_note": "sender_ms: cpu_* marks from payload start (after pack); "
                              "outside_payload_ms = pack + ack wait; gpu_* spans from CUDA events. "
                              "receiver_ms: cpu_* marks from its receives' posting start; gpu_* "
                              "spans. Both recorded by bench/timeline.py (a transfer Tracer).",
            "rows": rows, "target": "ratio >= 0.85"}


