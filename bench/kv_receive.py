"""KV arrival on a busy decode worker: receiver thread (default) vs. receiving between model steps.

One run starts `pdserve serve --prefill 1 --decode 1` twice on port 0 — the default (the decode
worker's KV receiver on its own thread) and `--no-kv-receiver-thread` (the receiver runs only
when the worker's loop polls it, between model steps) — and in each:
1. starts `--busy` streaming requests with long outputs, so the decode worker steps all along;
2. once they stream, sends `--requests` long prompts one after another (`max_tokens` 2, each
   prompt different: no prefix-cache hit) and records each one's TTFT;
3. reads `pdserve:kv_transfer_seconds` / `_bytes` before and after step 2: the prefill worker's
   send-to-ack time of exactly those transfers (the busy requests' KV moved before step 2).
Prints the ratios (between-steps / thread) and writes JSON + Markdown under bench/results/.

    python -m bench.kv_receive [--prompt-tokens 1000] [--requests 5] [--busy 4] [--out PATH]
    # on two GPUs:
    python -m bench.kv_receive --serve-args '--transport nccl --model DIR --load-format dummy ...'
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.sweep import LaunchedServer
from bench.transfer import machine

RESULTS = Path(__file__).resolve().parent / "results"
FILLER = ("The lighthouse keeper counted the ships that passed each night and wrote their names "
          "in a worn leather book. ")


def _metric(client: httpx.Client, name: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def _busy(url: str, max_tokens: int, started: threading.Event, stop: threading.Event) -> None:
    """One long streaming request; returns when it ends or `stop` is set (closing the
    connection aborts it on the server)."""
    body = {"prompt": "Write a long story about a lighthouse.", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with (httpx.Client(base_url=url, timeout=600) as c,
          c.stream("POST", "/v1/completions", json=body) as r):
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                started.set()
            if stop.is_set():
                return


def _ttft(client: httpx.Client, prompt: str) -> float:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"request failed: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                return time.perf_counter() - t0
    raise RuntimeError("stream ended without a token")


def run_mode(thread: bool, args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--prefill", "1", "--decode", "1", "--max-model-len", str(args.max_model_len),
             *(shlex.split(args.serve_args) if args.serve_args
               else ["--kv-cache-memory", args.kv_cache_memory])]
    if not thread:
        flags.append("--no-kv-receiver-thread")
    cmd = [sys.executable, "-m", "deploy.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           *flags]
    with LaunchedServer(cmd) as srv, httpx.Client(base_url=srv.url or "", timeout=600) as client:
        words = len(FILLER.split())
        prompts = [f"Note {i}. " + FILLER * max(1, args.prompt_tokens // (words + 4))
                   for i in range(args.requests + 1)]
        _ttft(client, prompts.pop())  # warm-up: first transfer sets up the data connection
        stop = threading.Event()
        started = [threading.Event() for _ in range(args.busy)]
        busy = [threading.Thread(target=_busy, args=(srv.url, args.busy_tokens, s, stop),
                                 daemon=True)
                for s in started]
        for t in busy:
            t.start()
        for s in started:
            if not s.wait(120):
                raise RuntimeError("busy requests did not start streaming")
        seconds0, bytes0 = (_metric(client, "pdserve:kv_transfer_seconds_total"),
                            _metric(client, "pdserve:kv_transfer_bytes_total"))
        ttft = [_ttft(client, p) for p in prompts]
        time.sleep(0.5)  # the last transfer's event reaches the proxy's metrics
        seconds = _metric(client, "pdserve:kv_transfer_seconds_total") - seconds0
        nbytes = _metric(client, "pdserve:kv_transfer_bytes_total") - bytes0
        still_busy = all(t.is_alive() for t in busy)
        stop.set()
    for t in busy:
        t.join(30)
    return {"receiver": "thread" if thread else "between-steps",
            "ttft_s": [round(x, 4) for x in ttft],
            "ttft_median_s": round(statistics.median(ttft), 4),
            "kv_seconds_per_transfer": round(seconds / len(ttft), 4),
            "kv_mib_per_transfer": round(nbytes / len(ttft) / 2**20, 2),
            "kv_gbps": round(nbytes / seconds / 1e9, 3) if seconds > 0 else None,
            "busy_streams_ran_throughout": still_busy}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# kv_receive: KV arrival on a busy decode worker ({result['model']})", "",
             f"{result['date']} · {m.get('cpu', '')} · {m.get('cores', '')} cores · "
             f"{result['busy']} busy streams · {result['requests']} prompts of "
             f"~{result['prompt_tokens']} tokens, one at a time", "",
             "| decode KV receiver | TTFT median s | KV send-to-ack s per transfer "
             "| MiB per transfer | GB/s |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['receiver']} | {r['ttft_median_s']} | {r['kv_seconds_per_transfer']} | "
                     f"{r['kv_mib_per_transfer']} | {r['kv_gbps']} |")
    lines += ["", f"Ratios (between-steps / thread): TTFT {result['ttft_ratio']}, KV transfer time "
                  f"{result['kv_seconds_ratio']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--busy", type=int, default=4,
                    help="long streaming requests keeping the decode worker busy")
    ap.add_argument("--busy-tokens", type=int, default=1000)
    ap.add_argument("--kv-cache-memory", default="512MiB")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--serve-args", default="",
                    help="instead of --kv-cache-memory: more `pdserve serve` flags "
                    "(e.g. on two GPUs: '--transport nccl --model DIR --load-format dummy')")
    ap.add_argument("--model-name", default="SmolLM2-135M-Instruct, CPU fp32",
                    help="for the report")
    ap.add_argument("--out", type=Path, default=RESULTS / "kv_receive.json")
    args = ap.parse_args()
    started = machine()
    rows = [run_mode(thread, args) for thread in (True, False)]
    thread_row, loop_row = rows
    result = {"benchmark": "kv_receive", "model": args.model_name, "serve_args": args.serve_args,
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": started,
              "prompt_tokens": args.prompt_tokens, "requests": args.requests, "busy": args.busy,
              "rows": rows,
              "ttft_ratio": round(loop_row["ttft_median_s"] / thread_row["ttft_median_s"], 3),
              "kv_seconds_ratio": round(loop_row["kv_seconds_per_transfer"]
                                        / max(thread_row["kv_seconds_per_transfer"], 1e-9), 3),
              "load_avg_end": os.getloadavg()}
    for r in rows:
        print(f"{r['receiver']:>13}: TTFT median {r['ttft_median_s']:.3f} s | KV send-to-ack "
              f"{r['kv_seconds_per_transfer']:.3f} s per transfer ({r['kv_mib_per_transfer']} MiB, "
              f"{r['kv_gbps']} GB/s) | busy streams ran throughout: "
              f"{r['busy_streams_ran_throughout']}")
    print(f"between-steps / thread: TTFT x{result['ttft_ratio']}, "
          f"KV transfer time x{result['kv_seconds_ratio']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
