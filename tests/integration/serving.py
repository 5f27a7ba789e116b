"""Helpers for end-to-end tests: start `pdserve serve` as a real process and talk to it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx

from protocol.auth import generate_secret, secret_env

LOG_ARGS: list[str] = []  # e.g. ["--log-level", "DEBUG"] while diagnosing
URL_RE = re.compile(r"serving .* on (http://\d+\.\d+\.\d+\.\d+:\d+)")
NO_WARMUP = ("--warmup-s", "0")  # the warm-up only seeds adaptive placement's cost models
COLOCATED = ("--colocated",)
DISAGG = ("--prefill", "1", "--decode", "1", "--placement", "remote", *NO_WARMUP)
"""The flags of the two deployments `DeploymentPool` shares between test modules."""
API_KEY = "test-key"
HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 2.0, 3.0
GUARDED = ("--colocated", *NO_WARMUP, "--api-key", API_KEY, "--header-timeout-s",
           str(HEADER_TIMEOUT_S), "--body-timeout-s", str(BODY_TIMEOUT_S))
"""A colocated deployment behind `--api-key API_KEY` with short HTTP timeouts, shared by
tests/integration/test_colocated.py and tests/security/test_http_limits.py."""


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: list[str] = field(default_factory=list)
    secret: bytes | None = None  # the deployment's cluster secret, where the test chose it

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def worker_pids(self) -> dict[str, int]:
        with self.client() as c:
            return {w["worker_id"]: w["pid"] for w in c.get("/status").json()["workers"]}

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a Prometheus metric's samples (optionally only those whose labels contain
        `labels`)."""
        with self.client() as c:
            text = c.get("/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_idle_blocks(self, timeout_s: float = 20.0) -> float:
        """Wait until every worker reports zero used KV blocks; returns the final sum."""
        deadline = time.monotonic() + timeout_s
        used = -1.0
        while time.monotonic() < deadline:
            used = self.metric("pdserve:kv_cache_used_blocks")
            if used == 0:
                return used
            time.sleep(0.3)
        return used


@contextlib.contextmanager
def serve(*args: str, timeout_s: float = 180.0, host: str = "127.0.0.1",
          prefix: tuple[str, ...] = (), secret: bytes | None = None) -> Iterator[Server]:
    """`pdserve serve --port 0 ARGS`, yielding once the URL is printed; always stops it.
    `prefix` goes before the command (e.g. `ip netns exec NS` to start it in a namespace);
    `secret`: the deployment's cluster secret (else the launcher makes one)."""
    cmd = [*prefix, sys.executable, "-m", "deploy.cli", *LOG_ARGS, "serve", "--host", host,
           "--port", "0", "--kv-cache-memory", "256MiB", "--max-model-len", "2048", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(secret_env(secret) if secret else {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    log: list[str] = []
    found: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            m = URL_RE.search(line)
            if m and not found:
                found.append(m.group(1))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    try:
        while not found:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pdserve serve did not start:\n" + "".join(log[-60:]))
            time.sleep(0.1)
        yield Server(proc, found[0], log, secret)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class DeploymentPool:
    """`pdserve serve` deployments shared by the test modules that ask for the same flags
    (tests/conftest.py's `shared_deployment` fixture): each starts once, on first use, and runs
    until `close()`. For tests that leave a deployment as they found it (no killed worker, KV
    blocks back to zero; counters compared as deltas): a module that breaks one starts its own.
    Each runs with a cluster secret the tests hold (`Server.secret`: tests/security attacks its
    internal planes as an insider or with the wrong key).
    """

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._running: dict[tuple[str, ...], Server] = {}

    def get(self, *flags: str) -> Server:
        server = self._running.get(flags)
        if server is None:
            server = self._running[flags] = self._stack.enter_context(
                serve(*flags, secret=generate_secret()))
        if server.proc.poll() is not None:
            raise RuntimeError(f"the shared deployment {flags} exited (an earlier test module "
                               "took it down?):\n" + "".join(server.log[-60:]))
        return server

    def close(self) -> None:
        """Stop every deployment started so far (a later `get` starts a fresh one)."""
        self._running.clear()
        stack, self._stack = self._stack, contextlib.ExitStack()
        stack.close()


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    """Parse an SSE body: yields each `data:` JSON object, and the string "[DONE]"."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        yield data if data == "[DONE]" else json.loads(data)


def is_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def assert_exits(pid: int, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not is_alive(pid), f"{what} kept running"


def kill_rank_mid_stream(c: httpx.Client, body: dict, rank_pid: int, within_s: float) -> dict:
    """Stream `body`, SIGKILL TP rank `rank_pid` after the first events; the stream must end
    (`[DONE]`) within `within_s` with an error event, whose `error` object is returned."""
    return break_mid_stream(c, body, lambda: os.kill(rank_pid, signal.SIGKILL), within_s)


def break_mid_stream(c: httpx.Client, body: dict, kill: Callable[[], None],
                     within_s: float) -> dict:
    """Stream `body`, call `kill` after the first events; the stream must end (`[DONE]`) within
    `within_s` with an error event, whose `error` object is returned."""
    events: list[dict | str] = []
    t0 = 0.0
    with c.stream("POST", "/v1/completions", json=body) as r:
        for event in sse_events(r):
            events.append(event)
            if len(events) == 2:
                kill()
                t0 = time.monotonic()
    assert time.monotonic() - t0 < within_s
    assert events[-1] == "[DONE]"
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert errors, json.dumps(events[-3:])
    return errors[-1]["error"]
