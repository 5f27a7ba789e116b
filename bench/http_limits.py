"""What hostile or huge HTTP requests cost a running proxy: time to answer, `/health` latency
meanwhile, and the proxy's memory.

Starts `pdserve serve --colocated` (SmolLM2, 127.0.0.1) from this checkout and, with
`--compare PATH`, the same from another checkout (e.g. the main branch before the HTTP limits)
in the same run, then sends each case once while a thread polls `/health` every 50 ms:
a 50 MB JSON body (Content-Length and chunked), a 4 MiB prompt, ~1M token ids, 100k empty chat
messages, a 160k-character prompt, and 200 connections that never finish their headers.

    python -m bench.http_limits [--compare /work/main] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.transfer import RESULTS, machine

URL_RE = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+)")
BIG = 50 * 2**20


def _cases() -> dict[str, tuple[str, Any]]:
    """Bodies built up front, so that no client-side work competes with the /health probe."""
    big = json.dumps({"prompt": "a" * BIG, "max_tokens": 1}).encode()
    parts = [big[i:i + 2**20] for i in range(0, len(big), 2**20)]

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        yield from parts

    return {
        "50MB JSON, Content-Length": ("/v1/completions", big),
        "50MB JSON, chunked": ("/v1/completions", chunks),
        "4MiB prompt text": ("/v1/completions",
                             json.dumps({"prompt": "hello world " * 340_000, "max_tokens": 1})),
        "1M token ids (2.9 MiB)": ("/v1/completions",
                                   json.dumps({"prompt": [1] * 1_000_000, "max_tokens": 1})),
        "100k empty chat messages (3.2 MiB)": ("/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": ""}] * 100_000, "max_tokens": 1})),
        "160k-character prompt": ("/v1/completions", json.dumps(
            {"prompt": "hello world, this is text " * 6000, "max_tokens": 1})),
    }


class _Health:
    def __init__(self, url: str) -> None:
        self.url, self.worst, self.count, self.errors = url, 0.0, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    c.get("/health")
                except httpx.HTTPError:
                    self.errors += 1
                self.worst = max(self.worst, time.monotonic() - t0)
                self.count += 1
                time.sleep(0.05)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS:")).split()[1]) / 1024


def _start(pythonpath: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "deploy.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--colocated", "--kv-cache-memory", "256MiB", "--max-model-len", "2048"]
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=pythonpath)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = URL_RE.search(line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m.group(1)
    raise RuntimeError(f"pdserve serve from {pythonpath} did not start")


def _one(url: str, pid: int, path: str, body: Any) -> dict[str, Any]:
    health = _Health(url)
    rss = _rss_mib(pid)
    health.thread.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=300) as c:
            r = c.post(path, content=body() if callable(body) else body,
                       headers={"Content-Type": "application/json"})
            status: Any = r.status_code
    except httpx.HTTPError as e:
        status = type(e).__name__
    seconds = time.monotonic() - t0
    time.sleep(0.3)
    health.stop.set()
    health.thread.join(300)
    return {"status": status, "seconds": round(seconds, 3),
            "health_worst_ms": round(health.worst * 1000, 1), "health_polls": health.count,
            "health_errors": health.errors,
            "rss_growth_mib": round(_rss_mib(pid) - rss, 1)}


def _slowloris(url: str, n: int = 200, wait_s: float = 15.0) -> dict[str, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    socks = [socket.create_connection((host, int(port))) for _ in range(n)]
    for s in socks:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    closed: set[int] = set()
    while time.monotonic() - t0 < wait_s and len(closed) < n:
        for i, s in enumerate(socks):
            s.settimeout(0.001)
            try:
                if s.recv(1) == b"":
                    closed.add(i)
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                closed.add(i)
        time.sleep(0.2)
    t1 = time.monotonic()
    ok = httpx.get(url + "/health", timeout=30).status_code
    health_ms = (time.monotonic() - t1) * 1000
    for s in socks:
        s.close()
    return {"connections": n, "closed_within_s": wait_s, "closed": len(closed),
            "health_status_after": ok, "health_ms_after": round(health_ms, 1)}


def run(checkout: str) -> dict[str, Any]:
    proc, url = _start(checkout)
    try:
        httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=120)
        out = {name: _one(url, proc.pid, path, body) for name, (path, body) in _cases().items()}
        out["200 partial requests (slowloris)"] = _slowloris(url)
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", default=None, help="Another checkout to run side by side.")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    here = str(Path(__file__).resolve().parents[1])
    result: dict[str, Any] = {"benchmark": "http_limits", "machine": machine(),
                              "command": " ".join(["python -m bench.http_limits", *sys.argv[1:]]),
                              "this_checkout": {"commit": subprocess.run(
                                  ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                  text=True).stdout.strip(), **run(here)}}
    if args.compare:
        commit = subprocess.run(["git", "-C", args.compare, "rev-parse", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        result["compare_checkout"] = {"path": args.compare, "commit": commit,
                                      **run(args.compare)}
    out = args.out or RESULTS / f"http_limits_cpu_{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
