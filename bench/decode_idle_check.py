"""Is a disaggregated decode worker's decode step slower than a colocated worker's, with nothing
else going on? (2026-12-06: under the placement sweep's load, the 1p1d decode worker's decode
steps took 1.17-1.33x the profile, a colocated worker's 0.99x.)

One request at a time (a short prompt, 120 output tokens, 6 requests) against `--prefill 1
--decode 1 --placement remote` (the decode worker on core 1, the prefill worker on core 0, idle
between prompts) and against `--colocated --decode 2`, `--repeats` times each, alternating,
workers pinned (`--cpu-affinity 0,1`, one torch thread), no warm-up, servers at DEBUG; each
worker's batch-1 decode steps (its step lines) give p50 / p90. Alternating the two
configurations shows the machine's drift beside their difference.

    python -m bench.decode_idle_check [--repeats 2]

Writes bench/results/decode_idle_check_<date>.md with the command.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CONFIGS = {"1p1d": ["--prefill", "1", "--decode", "1", "--placement", "remote"],
           "colocated-x2": ["--colocated", "--decode", "2"]}
DECODE_STEP = re.compile(r"\[\w+ ([\w-]+)\] engine\.llm_engine: step ([\d.]+) ms: 0 prefill "
                         r"tokens in 0 prompts \(token context 0\), 1 decoding")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(flags: list[str], log_path: Path, requests: int = 6) -> dict[str, list[float]]:
    """Serves `flags`, sends the requests one by one; batch-1 decode step ms per worker."""
    port = _free_port()
    cmd = [sys.executable, "-m", "deploy.cli", "--log-level", "debug", "serve", "--host",
           "127.0.0.1", "--port", str(port), "--kv-cache-memory", "256MiB", "--max-model-len",
           "2048", "--cpu-affinity", "0,1", "--warmup-s", "0", *flags]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            with httpx.Client(base_url=url, timeout=120) as c:
                for i in range(requests):
                    r = c.post("/v1/completions", json={
                        "prompt": f"Tell me a story number {i}.", "max_tokens": 120,
                        "ignore_eos": True, "temperature": 0})
                    r.raise_for_status()
        finally:
            proc.terminate()
            proc.wait(30)
    steps: dict[str, list[float]] = {}
    with log_path.open(errors="replace") as f:
        for line in f:
            if m := DECODE_STEP.search(line):
                steps.setdefault(m.group(1), []).append(float(m.group(2)))
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="decode_idle_"))
    rows = []
    for rep in range(args.repeats):
        for name, flags in CONFIGS.items():
            for worker, ms in run(flags, logs / f"{name}_{rep}.log").items():
                ms.sort()
                rows.append(f"| {rep + 1} | {name} | {worker} | {len(ms)} | "
                            f"{statistics.median(ms):.1f} | {ms[int(0.9 * len(ms))]:.1f} |")
                print(rows[-1], flush=True)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    text = "\n".join([
        f"# Decode steps at batch 1, disaggregated vs colocated ({day})", "",
        f"`python -m bench.decode_idle_check {shlex.join(argv or sys.argv[1:])}`", "",
        f"{os.cpu_count()} CPUs; workers pinned one per core, one request at a time; logs {logs}",
        "", "| repeat | config | worker | decode steps | p50 ms | p90 ms |",
        "| ---: | --- | --- | ---: | ---: | ---: |", *rows, ""])
    out = Path(args.out_dir) / f"decode_idle_check_{day}.md"
    out.write_text(text)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
