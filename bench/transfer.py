"""KV transfer micro-benchmark (not a test). Prints ratios measured side by side in one run.

ZMQ (default): SmolLM2-135M-shaped KV (30 layers, 3 KV heads, head_dim 64, bf16: 22.5 KiB per
token) at 128 / 1k / 8k tokens, scattered paged source cache → scattered paged destination cache
over tcp loopback (header, validation, ack), beside a plain Python socket sending the same bytes
over loopback in the same run (sendall of one contiguous buffer holding a copy of the KV →
recv_into one preallocated buffer; the buffer is written first so that, like the cache, it is
real memory and not the kernel's shared zero page). Columns: the default stream payload path
(writev/readv on a data connection; checksum off and on; contiguous source blocks) and the ZMQ
multipart frames path (`payload="frames"`). Sender and receiver are separate processes; each
timing runs from the start of `send` to the receiver's ack, raw and ZMQ repetitions alternate so
background load hits both alike. Writes bench/results/transfer_zmq.json and .md.

    python bench/transfer.py [--tokens 128 1024 8192] [--repeats 10]

NCCL (`--nccl`, needs 2 GPUs): Llama-3-8B-shaped KV (32 layers, 8 KV heads, head_dim 128,
bf16: 128 KiB per token) at 4k tokens, scattered paged blocks on GPU 0 → scattered paged blocks
on GPU 1 through transfer/nccl/transport.py, beside torch.distributed NCCL send/recv of one
contiguous buffer of the same size. Spawns its two ranks itself. Writes
bench/results/transfer_nccl.json.

    python bench/transfer.py --nccl [--tokens 4096] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kv_fill import fill_random
from engine.kv_spec import KvDtype, KvSpec
from transfer.convert.cache import PagedKvCache

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64}
LLAMA3_8B = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128}
BLOCK = 16


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_avg_start": os.getloadavg()}


def scattered_table(num_tokens: int, num_blocks: int, gen: torch.Generator, contiguous: bool) -> list[int]:
    need = -(-num_tokens // BLOCK)
    if contiguous:
        start = int(torch.randint(0, num_blocks - need + 1, (1,), generator=gen))
        return list(range(start, start + need))
    return torch.randperm(num_blocks, generator=gen)[:need].tolist()


# ---- ZMQ ------------------------------------------------------------------------------------------
def _raw_server(listener: socket.socket, capacity: int) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(capacity)
    view = memoryview(buf)
    while True:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        got = 0
        while got < n:
            got += conn.recv_into(view[got:n])
        conn.sendall(b"k")


def _zmq_sender_proc(pipe, endpoint: str, raw_port: int, max_tokens: int, chunk_bytes: int) -> None:
    from transfer.convert.pack import PackOptions
    from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig

    torch.set_num_threads(1)
    spec = KvSpec(**SMOLLM2, block_size=BLOCK, dtype=KvDtype.BFLOAT16)
    num_blocks = 2 * max_tokens // BLOCK
    src = PagedKvCache.allocate(spec, num_blocks)
    fill_random(src, torch.Generator().manual_seed(1))
    payload = torch.cat([t.reshape(-1).view(torch.uint8) for ts in src.layers for t in ts])
    payload = payload[:max_tokens * spec.bytes_per_token].clone()  # the KV's bytes, in real memory
    raw = socket.create_connection(("127.0.0.1", raw_port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pack = PackOptions(chunk_bytes=chunk_bytes)
    senders = {(payload_path, cs): ZmqKvSender(endpoint, ZmqSenderConfig(checksum=cs, pack=pack, payload=payload_path))
               for payload_path in ("stream", "frames") for cs in (False, True)}
    gen = torch.Generator().manual_seed(2)
    while True:
        cmd = pipe.recv()
        if cmd[0] == "stop":
            break
        if cmd[0] == "raw":
            nbytes = cmd[1]
            t0 = time.perf_counter()
            raw.sendall(struct.pack("<Q", nbytes))
            raw.sendall(memoryview(payload.numpy())[:nbytes])
            raw.recv(1)
            pipe.send(time.perf_counter() - t0)
        else:
            _, rid, tokens, checksum, contiguous, payload_path = cmd
            table = scattered_table(tokens, num_blocks, gen, contiguous)
            res = senders[(payload_path, checksum)].send(src, table, 0, tokens, request_id=rid)
            pipe.send(res.seconds)
    for s in senders.values():
        s.close()
    raw.close()


def run_zmq(args: argparse.Namespace) -> dict:
    from transfer.endpoint.receiver import ZmqKvReceiver, ZmqReceiverConfig

    torch.set_num_threads(1)
    started = machine()
    max_tokens = max(args.tokens)
    spec = KvSpec(**SMOLLM2, block_size=BLOCK, dtype=KvDtype.BFLOAT16)
    num_blocks = 2 * max_tokens // BLOCK
    dst = PagedKvCache.allocate(spec, num_blocks)
    done: dict[str, object] = {}
    rx = ZmqKvReceiver(dst, ZmqReceiverConfig(endpoint=args.endpoint),
                       on_complete=lambda r, reps: done.__setitem__(r, reps),
                       on_release=lambda r, e: done.__setitem__(r, e))
    rx.start()
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_raw_server, args=(listener, max_tokens * spec.bytes_per_token), daemon=True).start()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_zmq_sender_proc, args=(child, rx.endpoint, listener.getsockname()[1], max_tokens,
                                                                    args.chunk_kib << 10))
    proc.start()
    gen = torch.Generator().manual_seed(3)
    rows = []
    seq = 0
    for tokens in args.tokens:
        nbytes = tokens * spec.bytes_per_token
        times: dict[str, list[float]] = {"raw": [], "zmq": [], "zmq_checksum": [], "zmq_contiguous": [],
                                         "zmq_frames": [], "zmq_frames_checksum": []}
        for rep in range(args.repeats + 2):  # two warm-ups
            for name in times:
                if name == "raw":
                    parent.send(("raw", nbytes))
                else:
                    seq += 1
                    rid = f"bench-{seq}"
                    rx.expect(rid, scattered_table(tokens, num_blocks, gen, contiguous=False))
                    parent.send(("zmq", rid, tokens, name.endswith("checksum"), name == "zmq_contiguous",
                                 "frames" if name.startswith("zmq_frames") else "stream"))
                seconds = parent.recv()
                if rep >= 2:
                    times[name].append(seconds)
        gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
        row = {"tokens": tokens, "bytes": nbytes, **{f"{k}_gbps": round(v, 3) for k, v in gbps.items()},
               "ratio": round(gbps["zmq"] / gbps["raw"], 3),
               "ratio_checksum": round(gbps["zmq_checksum"] / gbps["raw"], 3),
               "ratio_contiguous": round(gbps["zmq_contiguous"] / gbps["raw"], 3),
               "ratio_frames": round(gbps["zmq_frames"] / gbps["raw"], 3),
               "ratio_frames_checksum": round(gbps["zmq_frames_checksum"] / gbps["raw"], 3)}
        rows.append(row)
        print(f"{tokens:>6} tokens {nbytes / 2**20:8.1f} MiB | raw socket {gbps['raw']:6.2f} GB/s | "
              f"stream {gbps['zmq']:6.2f} GB/s (ratio {row['ratio']:.2f}) | checksum {gbps['zmq_checksum']:6.2f} "
              f"({row['ratio_checksum']:.2f}) | contiguous blocks {gbps['zmq_contiguous']:6.2f} "
              f"({row['ratio_contiguous']:.2f}) | frames {gbps['zmq_frames']:6.2f} ({row['ratio_frames']:.2f}) | "
              f"frames+checksum {gbps['zmq_frames_checksum']:6.2f} ({row['ratio_frames_checksum']:.2f})", flush=True)
    parent.send(("stop",))
    proc.join(timeout=30)
    rx.close()
    failures = [k for k, v in done.items() if not isinstance(v, list)]
    return {"benchmark": "transfer_zmq", "model": "SmolLM2-135M KV (30 layers, 3 kv heads, dim 64, bf16)",
            "bytes_per_token": spec.bytes_per_token, "block_size": BLOCK, "endpoint": args.endpoint,
            "chunk_bytes": args.chunk_kib << 10, "payload_paths": {
                "zmq": "stream (default): header on ZMQ, writev/readv on a data connection",
                "zmq_frames": "ZMQ multipart DATA frames (payload='frames', chunk_bytes)"},
            "repeats": args.repeats, "statistic": "median", "machine": started,
            "failed_transfers": len(failures), "rows": rows, "target": "ratio >= 0.9 at 8192 tokens",
            "load_avg_end": os.getloadavg()}


# ---- NCCL -----------------------------------------------------------------------------------------
def _median_breakdown(samples: list[dict]) -> dict:
    keys = {k for d in samples for k, v in d.items() if isinstance(v, (int, float)) and v is not None}
    return {k: round(statistics.median(d[k] for d in samples if d.get(k) is not None), 3) for k in sorted(keys)}


def _nccl_rank(rank: int, args: argparse.Namespace, endpoint_q, result_q) -> None:
    import torch.distributed as dist

    from transfer.endpoint.receiver import ZmqKvReceiver, ZmqReceiverConfig
    from transfer.endpoint.sender import ZmqKvSender
    from transfer.nccl.transport import NcclReceiverPlugin, NcclSenderPlugin

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    tokens = args.tokens[0]
    spec = KvSpec(**LLAMA3_8B, block_size=BLOCK, dtype=KvDtype.BFLOAT16)
    num_blocks = 4 * tokens // BLOCK
    nbytes = tokens * spec.bytes_per_token
    cache = PagedKvCache.allocate(spec, num_blocks, device=dev)
    gen = torch.Generator().manual_seed(rank)
    src_gen = torch.Generator().manual_seed(0)  # rank 1 replays rank 0's tables to verify
    dist.init_process_group("nccl", init_method=args.dist_url, rank=rank, world_size=2)
    flat = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    if rank == 1:
        done: dict[str, object] = {}
        ack_marks: dict[str, float] = {}
        ended = threading.Condition()

        def end(rid: str, outcome: object) -> None:  # on the receiver's thread
            ack_marks[rid] = time.perf_counter()  # the ack went out just before this callback
            with ended:
                done[rid] = outcome
                ended.notify_all()

        plugin = NcclReceiverPlugin(dev)
        rx = ZmqKvReceiver(cache, ZmqReceiverConfig(endpoint="tcp://127.0.0.1:0"),
                           on_complete=end, on_release=end, nccl=plugin)
        endpoint_q.put(rx.endpoint)
        rx.start()
        ref = PagedKvCache.allocate(spec, num_blocks, device=dev)  # the sender's contents, to verify
        fill_random(ref, torch.Generator(device="cpu").manual_seed(7))
    else:
        fill_random(cache, torch.Generator(device="cpu").manual_seed(7))
        plugin = NcclSenderPlugin(dev)
        tx = ZmqKvSender(endpoint_q.get(), nccl=plugin)
    rows, bad = [], []
    plan = ([("eager", c) for c in args.chunk_mib] + [("ready", c) for c in args.ready_chunk_mib]
            + [("eager-nonblocking", c) for c in args.nonblocking_chunk_mib])
    for mode, chunk_mib in plan:
        times: dict[str, list[float]] = {"torch_nccl": [], "pdserve_nccl": []}
        breakdown: list[dict] = []
        marks: list[dict] = []  # absolute perf_counter marks per repetition (one clock for both ranks)
        if rank == 0:
            plugin.chunk_bytes = chunk_mib << 20
            eager, blocking = mode != "ready", mode != "eager-nonblocking"
            if (plugin.eager, plugin.blocking) != (eager, blocking):  # a new link's hello says which
                plugin.eager, plugin.blocking = eager, blocking
                plugin.reset()
        for rep in range(args.repeats + 3):
            # baseline: one contiguous buffer through torch.distributed
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(flat, 1)
            else:
                dist.recv(flat, 0)
            torch.cuda.synchronize()
            if rep >= 3:
                times["torch_nccl"].append(time.perf_counter() - t0)
            # pdserve: scattered blocks -> scattered blocks, header over ZMQ, ack back
            rid = f"nccl-{mode}-{chunk_mib}-{rep}"
            if rank == 1:
                dst_table = torch.randperm(num_blocks, generator=gen)[:tokens // BLOCK].tolist()
                src_table = torch.randperm(num_blocks, generator=src_gen)[:tokens // BLOCK].tolist()
                rx.expect(rid, dst_table)
            dist.barrier()
            if rank == 0:
                table = torch.randperm(num_blocks, generator=gen)[:tokens // BLOCK].tolist()
                t0 = time.perf_counter()
                res = tx.send(cache, table, 0, tokens, request_id=rid)
                wall = time.perf_counter() - t0
                t = plugin.timings()
                payload = t.get("cpu_sent_ms", 0.0)
                t["total_ms"] = wall * 1e3
                t["outside_payload_ms"] = wall * 1e3 - payload  # pack + header send + ack wait
                if rep >= 3:
                    times["pdserve_nccl"].append(res.seconds)
                    breakdown.append(t)
                    marks.append({"send_called": t0, **plugin.last_marks, "send_returned": t0 + wall})
            else:  # the next barrier must not overlap this transfer's NCCL work
                with ended:  # sleeps without taking the GIL from the receiver's thread
                    ended.wait_for(lambda rid=rid: rid in done, timeout=120)
                reports = done.get(rid)
                if not isinstance(reports, list):
                    raise SystemExit(f"transfer {rid} failed on the receiver: {reports!r}")
                if rep >= 3:
                    breakdown.append(plugin.timings())
                    marks.append({**plugin.last_marks, "ack_sent": ack_marks.get(rid, float("nan"))})
                if rep == 0:  # bit-exact check of a few layers
                    src_ids = torch.tensor(src_table, device=dev)
                    dst_ids = torch.tensor(dst_table, device=dev)
                    for layer in (0, spec.num_layers // 2, spec.num_layers - 1):
                        for part, t in cache.parts(layer).items():
                            if not torch.equal(t[dst_ids], ref.parts(layer)[part][src_ids]):
                                bad.append(f"chunk {chunk_mib} MiB layer {layer} part {part}")
        if rank == 0:
            gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
            rows.append({"tokens": tokens, "bytes": nbytes, "mode": mode, "chunk_mib": chunk_mib,
                         **{f"{k}_gbps": round(v, 2) for k, v in gbps.items()},
                         "ratio": round(gbps["pdserve_nccl"] / gbps["torch_nccl"], 3),
                         "sender_ms": _median_breakdown(breakdown), "_marks": marks})
        else:
            rows.append({"mode": mode, "chunk_mib": chunk_mib, "receiver_ms": _median_breakdown(breakdown),
                         "_marks": marks})
    dist.barrier()
    if rank == 0:
        tx.close()
        result_q.put(("sender", rows))
    else:
        rx.close()
        result_q.put(("receiver", rows, bad))
    dist.destroy_process_group()


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
        print(f"{row['tokens']} tokens {row['bytes'] / 2**20:.0f} MiB {row['mode']} chunk {row['chunk_mib']} MiB | "
              f"torch.distributed send/recv {row['torch_nccl_gbps']:.1f} GB/s | pdserve NCCL "
              f"{row['pdserve_nccl_gbps']:.1f} GB/s | ratio {row['ratio']:.2f} (target >= 0.85)")
        print(f"   sender ms:   {row['sender_ms']}")
        print(f"   receiver ms: {row['receiver_ms']}")
        print(f"   timeline ms: {row['timeline_ms']}")
    print("data check:", "OK (bit-exact)" if not bad else f"MISMATCH {bad}")
    props = torch.cuda.get_device_properties(0)
    return {"benchmark": "transfer_nccl", "model": "Llama-3-8B KV (32 layers, 8 kv heads, dim 128, bf16)",
            "block_size": BLOCK, "repeats": args.repeats, "statistic": "median",
            "machine": {**machine(), "gpu": props.name, "gpus": torch.cuda.device_count()},
            "data_check": bad or "ok",
            "breakdown_note": "sender_ms: cpu_* marks from payload start (after pack + HEADER sent); "
                              "outside_payload_ms = pack + header + ack wait; gpu_* spans from CUDA events. "
                              "receiver_ms: cpu_* marks from header validated; gpu_* spans.",
            "rows": rows, "target": "ratio >= 0.85"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nccl", action="store_true", help="2-GPU NCCL benchmark instead of ZMQ")
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:0", help="ZMQ endpoint (tcp:// or ipc://)")
    ap.add_argument("--chunk-kib", type=int, default=1024, help="ZMQ chunk (pipelining unit) size")
    ap.add_argument("--chunk-mib", type=int, nargs="+", default=[128, 64, 256],
                    help="NCCL: sender chunk (gather + send unit) sizes to measure (eager sends)")
    ap.add_argument("--ready-chunk-mib", type=int, nargs="*", default=[128],
                    help="NCCL: chunk sizes to measure with the READY handshake (eager=False)")
    ap.add_argument("--nonblocking-chunk-mib", type=int, nargs="*", default=[128],
                    help="NCCL: chunk sizes to measure with eager sends on a non-blocking communicator")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.nccl:
        args.tokens = args.tokens or [4096]
        args.repeats = args.repeats or 20
        result, name = run_nccl(args), "transfer_nccl.json"
    else:
        args.tokens = args.tokens or [128, 1024, 8192]
        args.repeats = args.repeats or 10
        result, name = run_zmq(args), "transfer_zmq.json"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md').name}")


def markdown(result: dict) -> str:
    """The result as a table for the README (same numbers as the JSON)."""
    m = result["machine"]
    rows = result["rows"]
    cols = [k for k in rows[0] if k.endswith("_gbps") or k.startswith("ratio") or k in ("chunk_mib", "mode")]
    lines = [f"# {result['benchmark']}: {result['model']}", "",
             f"{m['date']} · {m.get('gpu', m['cpu'])} · {m['cores']} cores · torch {m['torch']} · "
             f"median of {result['repeats']} · target {result['target']}", "",
             "| tokens | MiB | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['bytes'] / 2**20:.1f} | " + " | ".join(str(r[c]) for c in cols) + " |")
    if "payload_paths" in result:
        lines += ["", "Columns: " + "; ".join(f"`{k}*` = {v}" for k, v in result["payload_paths"].items())
                  + "; `raw` = Python socket, one contiguous buffer holding the same bytes."]
    if "load_avg_end" in result:
        lines += ["", f"Load average at start/end: {m['load_avg_start']} / {result['load_avg_end']} "
                  "(other work shares this machine; raw and pdserve repetitions alternate)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
