"""What the worst frame a receiver still reads costs it: the largest frame each control socket
accepts (`ZMQ_MAXMSGSIZE`: the proxy's events, a worker's ctrl at several --max-model-len),
filled with the costliest msgpack per byte (empty arrays, empty maps), decoded by the real codec
(which refuses it). Frames over the limit are dropped by ZMQ before any byte is buffered, so
this is the most any one frame can hold a receiver (the proxy's event loop, a worker's loop).

    python -m bench.hostile_frames [--repeats 5] [--out bench/results/hostile_frames_cpu.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from datetime import date

from protocol.channel import frame_limit_for
from protocol.codec import MalformedMessage, MessageFamily
from protocol.decode_ctrl import DECODE_CTRL
from protocol.worker_events import WORKER_EVENTS
from proxy.cluster import EVENT_FRAME_BYTES


def worst_frame(num_bytes: int, item: bytes) -> bytes:
    """One envelope whose `d` is an array of `item`s filling `num_bytes`."""
    n = (num_bytes - 40) // len(item)
    head = b"\x83\xa1t\xa7Reserve\xa1v\x01\xa1d"
    return head + b"\xdd" + n.to_bytes(4, "big") + item * n


def seconds_to_refuse(family: MessageFamily, frame: bytes, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with contextlib.suppress(MalformedMessage):
            family.decode(frame, {"max_model_len": 1 << 30, "vocab_size": 1 << 30})
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    cases = [("proxy events", WORKER_EVENTS, EVENT_FRAME_BYTES)] + [
        (f"worker ctrl, max-model-len {n}", DECODE_CTRL, frame_limit_for(n))
        for n in (2048, 8192, 32768, 131072)]
    rows = []
    for name, family, limit in cases:
        for label, item in (("empty arrays", b"\x90"), ("empty maps", b"\x80")):
            s = seconds_to_refuse(family, worst_frame(limit, item), args.repeats)
            rows.append({"socket": name, "limit_bytes": limit, "filler": label,
                         "best_seconds": round(s, 5)})
            print(f"{name:32s} {limit / 1024:8.0f} KiB  {label:12s}  {s * 1e3:8.2f} ms")
    result = {"command": " ".join([sys.executable.rsplit("/", 1)[-1], "-m", "bench.hostile_frames",
                                   *sys.argv[1:]]),
              "date": date.today().isoformat(), "machine": platform.platform(),
              "note": "best of --repeats; a 16 MiB frame is dropped by ZMQ_MAXMSGSIZE unread",
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
