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
contiguous buffer of the same size (bench/transfer_nccl.py, with per-side breakdowns and one
timeline from bench/timeline.py). Spawns its two ranks itself. Writes
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


def scattered_table(num_tokens: int, num_blocks: int, gen: torch.Generator,
                    contiguous: bool) -> list[int]:
    need = -(-num_tokens // BLOCK)
    if contiguous:
        start = int(torch.randint(0, num_blocks - need + 1, (1,), generator=gen))
        return list(range(start, start + need))
    return torch.randperm(num_blocks, generator=gen)[:need].tolist()


# ---- ZMQ -----------------------------------------------------------------------------------------
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
    senders = {(payload_path, cs): ZmqKvSender(endpoint, ZmqSenderConfig(checksum=cs, pack=pack,
                                                                          payload=payload_path))
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


def _zmq_row(tokens: int, nbytes: int, times: dict[str, list[float]]) -> dict:
    """One size's result (GB/s per path and ratios to the raw socket), printed as a line."""
    gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    row = {"tokens": tokens, "bytes": nbytes,
           **{f"{k}_gbps": round(v, 3) for k, v in gbps.items()},
           "ratio": round(gbps["zmq"] / gbps["raw"], 3),
           "ratio_checksum": round(gbps["zmq_checksum"] / gbps["raw"], 3),
           "ratio_contiguous": round(gbps["zmq_contiguous"] / gbps["raw"], 3),
           "ratio_frames": round(gbps["zmq_frames"] / gbps["raw"], 3),
           "ratio_frames_checksum": round(gbps["zmq_frames_checksum"] / gbps["raw"], 3)}
    print(f"{tokens:>6} tokens {nbytes / 2**20:8.1f} MiB | "
          f"raw socket {gbps['raw']:6.2f} GB/s | "
          f"stream {gbps['zmq']:6.2f} GB/s (ratio {row['ratio']:.2f}) | "
          f"checksum {gbps['zmq_checksum']:6.2f} ({row['ratio_checksum']:.2f}) | "
          f"contiguous blocks {gbps['zmq_contiguous']:6.2f} ({row['ratio_contiguous']:.2f}) | "
          f"frames {gbps['zmq_frames']:6.2f} ({row['ratio_frames']:.2f}) | "
          f"frames+checksum {gbps['zmq_frames_checksum']:6.2f} "
          f"({row['ratio_frames_checksum']:.2f})", flush=True)
    return row


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
    threading.Thread(target=_raw_server, args=(listener, max_tokens * spec.bytes_per_token),
                     daemon=True).start()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_zmq_sender_proc, args=(child, rx.endpoint, listener.getsockname()[1],
                                                      max_tokens, args.chunk_kib << 10))
    proc.start()
    gen = torch.Generator().manual_seed(3)
    rows = []
    seq = 0
    for tokens in args.tokens:
        nbytes = tokens * spec.bytes_per_token
        times: dict[str, list[float]] = {"raw": [], "zmq": [], "zmq_checksum": [],
                                         "zmq_contiguous": [], "zmq_frames": [],
                                         "zmq_frames_checksum": []}
        for rep in range(args.repeats + 2):  # two warm-ups
            for name in times:
                if name == "raw":
                    parent.send(("raw", nbytes))
                else:
                    seq += 1
                    rid = f"bench-{seq}"
                    rx.expect(rid, scattered_table(tokens, num_blocks, gen, contiguous=False))
                    parent.send(("zmq", rid, tokens, name.endswith("checksum"),
                                 name == "zmq_contiguous",
                                 "frames" if name.startswith("zmq_frames") else "stream"))
                seconds = parent.recv()
                if rep >= 2:
                    times[name].append(seconds)
        rows.append(_zmq_row(tokens, nbytes, times))
    parent.send(("stop",))
    proc.join(timeout=30)
    rx.close()
    failures = [k for k, v in done.items() if not isinstance(v, list)]
    return {"benchmark": "transfer_zmq",
            "model": "SmolLM2-135M KV (30 layers, 3 kv heads, dim 64, bf16)",
            "bytes_per_token": spec.bytes_per_token, "block_size": BLOCK, "endpoint": args.endpoint,
            "chunk_bytes": args.chunk_kib << 10, "payload_paths": {
                "zmq": "stream (default): header on ZMQ, writev/readv on a data connection",
                "zmq_frames": "ZMQ multipart DATA frames (payload='frames', chunk_bytes)"},
            "repeats": args.repeats, "statistic": "median", "machine": started,
            "failed_transfers": len(failures), "rows": rows,
            "target": "ratio >= 0.9 at 8192 tokens",
            "load_avg_end": os.getloadavg()}


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
                    help="NCCL: chunk sizes to measure with eager sends on a non-blocking "
                    "communicator")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.nccl:
        args.tokens = args.tokens or [4096]
        args.repeats = args.repeats or 20
        from bench.transfer_nccl import run_nccl

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
    cols = [k for k in rows[0]
            if k.endswith("_gbps") or k.startswith("ratio") or k in ("chunk_mib", "mode")]
    lines = [f"# {result['benchmark']}: {result['model']}", "",
             f"{m['date']} · {m.get('gpu', m['cpu'])} · {m['cores']} cores · torch {m['torch']} · "
             f"median of {result['repeats']} · target {result['target']}", "",
             "| tokens | MiB | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['bytes'] / 2**20:.1f} | "
                     + " | ".join(str(r[c]) for c in cols) + " |")
    if "payload_paths" in result:
        lines += ["", "Columns: "
                  + "; ".join(f"`{k}*` = {v}" for k, v in result["payload_paths"].items())
                  + "; `raw` = Python socket, one contiguous buffer holding the same bytes."]
    if "load_avg_end" in result:
        lines += ["", f"Load average at start/end: {m['load_avg_start']} / "
                  f"{result['load_avg_end']} "
                  "(other work shares this machine; raw and pdserve repetitions alternate)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
