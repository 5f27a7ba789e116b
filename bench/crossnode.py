"""What a network between prefill and decode costs: TTFT over the netns testbed's shaped link.

    sudo python -m bench.crossnode [--rates unshaped,10gbit,1gbit,100mbit] \\
        [--placements remote,adaptive] [--input-len 512] [--num-prompts 8] [--output PREFIX]
        [--serve-args "--kv-wire-dtype auto;--kv-wire-dtype int8"]

For each link rate it builds the testbed (bench/netns.py: prefill worker, proxy and load
generator in `NAME-a`, decode worker in `NAME-b`), starts `pdserve serve --prefill 1 --decode 1`
for each placement with the two workers pinned one per core (`--cpu-affinity 0,1`, one torch
thread each; the proxy and the load generator share both cores) and, with `--serve-args`,
once per `;`-separated set of extra `pdserve serve` flags (variants compared in one run), sends
the prompts one at a time
(`pdserve bench --max-concurrency 1`, so TTFT is prefill + transfer + hops, no queueing), reads
the KV transfer time from the proxy's metrics, and tears the testbed down. Writes PREFIX.json and
PREFIX.md (with the command) and prints the table. With `--server-log-level debug`, each row
also gets where the prefill worker's send lane spent each request's KV (the median per request
of prefill/kv_outbox.py's "KV stream"/"KV whole" lines: waiting for parts, for their layers,
packing, the payload, filling buffers, acks) and, from the engines' step lines, each request's
own prefill and what followed it: the per-request form of issue 17's target, which compares a
layer-wise request with its own prefill instead of the `whole` server's (on this machine a 4k
prefill drifts by ~1 s between servers, more than a 10 Gbit/s link's transfer);
`--log-dir` keeps the servers' logs.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import netns, report
from bench.serving_trace import parse_log

URL_RE = re.compile(r"serving .* on (http://[\d.]+:\d+)")
SERVE_ARGS = ["--kv-cache-memory", "256MiB", "--max-model-len", "2048", "--cpu-affinity", "0,1",
              "--heartbeat-timeout-s", "30"]


def _in_ns(ns: str | None, *cmd: str) -> list[str]:
    """`cmd` inside namespace `ns`; as it is with `ns=None` (the `loopback` link)."""
    return ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)


STREAM_RE = re.compile(
    r"KV (?:stream|whole) \S+: (\d+) parts, ([\d.]+) MiB, ([\d.]+) ms from the first part "
    r"out: waiting for parts ([\d.]+), for their layers ([\d.]+), pack ([\d.]+), payload "
    r"([\d.]+) \(filling buffers ([\d.]+)\), acks ([\d.]+) ms")
STREAM_FIELDS = ("parts", "mib", "lane_ms", "queue_ms", "ready_ms", "pack_ms", "payload_ms",
                 "fill_ms", "ack_ms")


def stream_phases(log_text: str) -> dict[str, float]:
    """Median per request of each field of the prefill worker's "KV stream|whole" lines (empty
    without them), with the number of streams."""
    found = [tuple(float(x) for x in m.groups()) for m in STREAM_RE.finditer(log_text)]
    if not found:
        return {}
    return {"streams": float(len(found)),
            **{name: statistics.median(v[i] for v in found)
               for i, name in enumerate(STREAM_FIELDS)}}


def request_tails(result: Path, log_text: str) -> dict[str, list[float]]:
    """Per request (sent one at a time), from the prefill worker's DEBUG step lines: the seconds
    from its arrival to the end of its last prefill step (`to_prefill_end`: its own prefill and
    what came before it, measured in the same request) and from there to its first token
    (`tail`: the transfer left exposed, plus the hops). Empty without step lines."""
    steps = [s for s in parse_log(log_text.splitlines())[0]
             if s.who.startswith("prefill") and s.prefill_tokens]
    doc = json.loads(result.read_text()) if result.exists() else {}
    start = doc.get("started_at")
    if not steps or start is None:
        return {}
    out: dict[str, list[float]] = {"to_prefill_end": [], "tail": [], "own_prefill": []}
    for r in doc.get("requests", []):
        if r.get("error") or r.get("ttft_s") is None:
            continue
        arrival = start + r["start_s"]
        first = arrival + r["ttft_s"]
        mine = [s for s in steps if arrival <= s.at <= first]
        if not mine:
            continue
        end = max(s.at for s in mine)
        out["to_prefill_end"].append(end - arrival)
        out["tail"].append(first - end)
        out["own_prefill"].append(sum(s.seconds for s in mine))
    return out if out["tail"] else {}


def start_server(tb: netns.Testbed | None, placement: str, log_path: Path,
                  extra: list[str], log_level: str = "INFO") -> tuple[subprocess.Popen, str]:
    where = ["--host", "127.0.0.1"] if tb is None else [
        "--host", netns.ADDR_A, "--decode-netns", tb.ns_b, "--decode-host", netns.ADDR_B,
        "--internal-host", netns.ADDR_A]
    cmd = _in_ns(tb and tb.ns_a, sys.executable, "-m", "deploy.cli", "--log-level", log_level,
                 "serve", *where,
                 "--port", "0", "--prefill", "1", "--decode", "1", "--placement", placement,
                 *SERVE_ARGS, *extra)
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        m = URL_RE.search(log_path.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"pdserve serve did not start; see {log_path}")


def _kv_metrics(tb: netns.Testbed | None, url: str) -> dict[str, float]:
    text = subprocess.run(_in_ns(tb and tb.ns_a, "curl", "-s", f"{url}/metrics"),
                          capture_output=True, text=True, check=True, timeout=30).stdout
    out = {}
    for name in ("kv_transfer_bytes_total", "kv_transfer_seconds_total"):
        out[name] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith(f"pdserve:{name} "))
    placed = re.findall(r'pdserve:prefill_placement_total\{placement="(\w+)"\} (\S+)', text)
    out.update({f"placed_{k}": float(v) for k, v in placed})
    return out


def run_point(tb: netns.Testbed | None, placement: str, args: argparse.Namespace,
              workdir: Path, extra: str = "") -> list[dict[str, Any]]:
    """One server; a row per input length (KV metrics are the differences over its prompts)."""
    tag = f"{placement}-{time.monotonic_ns()}"
    log_path = workdir / f"serve-{tag}.log"
    proc, url = start_server(tb, placement, log_path, shlex.split(extra), args.server_log_level)
    seen = 0  # the log's length before each input length's prompts
    rows = []
    try:
        before = _kv_metrics(tb, url)
        for input_len in str(args.input_len).split(","):
            result = workdir / f"bench-{tag}-{input_len}.json"
            subprocess.run(_in_ns(tb and tb.ns_a, sys.executable, "-m", "deploy.cli", "bench",
                                  "--base-url", url, "--input-len", input_len,
                                  "--output-len", "8", "--num-prompts", str(args.num_prompts),
                                  "--max-concurrency", "1", "--warmup", str(args.warmup),
                                  "--no-progress",
                                  "--seed", "0", "--result-file", str(result),
                                  *shlex.split(args.bench_args)),
                           check=False, capture_output=True, timeout=1800)
            summary = json.loads(result.read_text())["summary"] if result.exists() else {}
            if not summary.get("ttft", {}).get("median"):  # every request failed: say why
                log = log_path.read_text()[-2000:]
                rows.append({"placement": placement, "serve_args": extra,
                             "input_len": int(input_len), "error": summary.get("errors") or log})
                continue
            after = _kv_metrics(tb, url)
            text = log_path.read_text(errors="replace")
            phases, tails = stream_phases(text[seen:]), request_tails(result, text[seen:])
            seen = len(text)
            kv = {k: v - before.get(k, 0.0) for k, v in after.items()}
            before = after
            n = max(kv.get("placed_remote", 0.0), 1.0)
            rows.append({"placement": placement, "serve_args": extra, "input_len": int(input_len),
                         "ttft_p50_ms": summary["ttft"]["median"] * 1e3,
                         "ttft_p90_ms": summary["ttft"]["p90"] * 1e3,
                         "kv_seconds_per_remote_request": kv["kv_transfer_seconds_total"] / n,
                         "kv_mib_per_remote_request": kv["kv_transfer_bytes_total"] / n / 2**20,
                         **({"stream_ms": phases} if phases else {}),
                         **({"tails": tails} if tails else {}), **kv})
    finally:
        proc.send_signal(2)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def phase_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The send lane's time per stream or whole transfer (median per request), where logged."""
    rows = [r for r in rows if r.get("stream_ms")]
    if not rows:
        return []
    out = ["", "Send lane per request (median, ms; `payload` includes `filling buffers`; "
           "prefill/kv_outbox.py DEBUG lines):", "",
           "| link | serve args | input | parts | lane total | waiting for parts | for layers | "
           "pack | payload | filling buffers | acks |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r["stream_ms"]
        out.append(f"| {r['link']} | {r['serve_args']} | {r['input_len']} | {m['parts']:.0f} | "
                   + " | ".join(f"{m[k]:.1f}" for k in ("lane_ms", "queue_ms", "ready_ms",
                                                        "pack_ms", "payload_ms", "fill_ms",
                                                        "ack_ms")) + " |")
    return out


def overlap_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 17's target for each layer-wise row that has its `whole` twin (same flags but
    `--kv-streaming whole`, same link and length), all from the same run: prefill-only = the
    twin's TTFT minus its KV seconds (TTFT = prefill + transfer + hops), transfer-only = the
    twin's KV seconds; target TTFT <= max(prefill, transfer) + 10 % of min(prefill, transfer);
    hidden = the share of the shorter phase the overlap removed."""
    pairs = _layerwise_pairs([r for r in rows if "error" not in r])
    out = ["", "Overlap (issue 17's target, p50s): prefill-only = whole TTFT - whole KV seconds,"
           " transfer-only = whole KV seconds, target = max + 10 % of min.", "",
           "| link | serve args | input | prefill-only (ms) | transfer-only (ms) | target (ms) "
           "| layerwise TTFT (ms) | shorter phase hidden | met |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r, twin in pairs:
        transfer = twin["kv_seconds_per_remote_request"] * 1e3
        prefill = twin["ttft_p50_ms"] - transfer
        target = max(prefill, transfer) + 0.1 * min(prefill, transfer)
        hidden = (twin["ttft_p50_ms"] - r["ttft_p50_ms"]) / max(min(prefill, transfer), 1e-9)
        out.append(f"| {r['link']} | {r['serve_args']} | {r['input_len']} | {prefill:.0f} | "
                   f"{transfer:.0f} | {target:.0f} | {r['ttft_p50_ms']:.0f} | {hidden:.0%} | "
                   f"{'yes' if r['ttft_p50_ms'] <= target else 'no'} |")
    return out if pairs else []


def _layerwise_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(layer-wise row, its `whole` twin: same link, length and other flags) for each
    layer-wise row of `rows` that has one."""
    by_key = {(r["link"], r["input_len"], r["serve_args"]): r for r in rows}
    pairs = []
    for r in rows:
        if "--kv-streaming layerwise" not in r["serve_args"]:
            continue
        twin = by_key.get((r["link"], r["input_len"], re.sub(
            r" ?--kv-stream-groups \d+", "", r["serve_args"]).replace(
            "--kv-streaming layerwise", "--kv-streaming whole")))
        if twin is not None:
            pairs.append((r, twin))
    return pairs


def tail_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 17's target per request, from the step lines of the same run (immune to the
    prefill's drift between servers): for each layer-wise request, prefill-only = its own
    arrival-to-last-prefill-step time + the whole twin's hops (its median tail minus its KV
    seconds), transfer-only = the twin's KV seconds; met when its TTFT <= max + 10 % of min.
    `exposed` = the layer-wise tail minus those hops: the transfer left after the prefill."""
    pairs = _layerwise_pairs([r for r in rows if "error" not in r and r.get("tails")])
    out = ["", "Overlap per request (issue 17's target, from the prefill worker's step lines: "
           "each request's own prefill; medians over requests):", "",
           "| link | serve args | input | own prefill, layer-wise / whole (ms) | transfer-only "
           "(ms) | hops (ms) | exposed (ms) | allowed (10 % of min) | requests met |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r, twin in pairs:
        t = twin["kv_seconds_per_remote_request"]
        hops = statistics.median(twin["tails"]["tail"]) - t
        tails = r["tails"]
        met = 0
        for to_end, tail in zip(tails["to_prefill_end"], tails["tail"], strict=True):
            prefill = to_end + hops
            met += to_end + tail <= max(prefill, t) + 0.1 * min(prefill, t)
        allowed = 0.1 * min(statistics.median(tails["to_prefill_end"]) + hops, t)
        exposed = statistics.median(tails["tail"]) - hops
        out.append(f"| {r['link']} | {r['serve_args']} | {r['input_len']} | "
                   f"{statistics.median(tails['own_prefill']) * 1e3:.0f} / "
                   f"{statistics.median(twin['tails']['own_prefill']) * 1e3:.0f} | {t * 1e3:.0f} | "
                   f"{hops * 1e3:.0f} | {exposed * 1e3:.0f} | {allowed * 1e3:.0f} | "
                   f"{met} of {len(tails['tail'])} |")
    return out if pairs else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.crossnode", description=__doc__)
    p.add_argument("--rates", default="unshaped,10gbit,1gbit,100mbit",
                   help="Link rates; `unshaped` is the testbed's link unshaped, `loopback` no "
                        "testbed at all (every process on 127.0.0.1; no root needed).")
    p.add_argument("--placements", default="remote,adaptive")
    p.add_argument("--input-len", default="512", help="Prompt length(s), comma-separated.")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="Warm-up prompts per point.")
    p.add_argument("--name", default="pdxn", help="Testbed name (namespaces NAME-a/-b).")
    p.add_argument("--note", default="")
    p.add_argument("--serve-args", default="", help="Extra `pdserve serve` flags; several sets "
                   "separated by ';' run one after the other at each point (e.g. "
                   "\"--kv-wire-dtype auto;--kv-wire-dtype int8\").")
    p.add_argument("--bench-args", default="", help="Extra `pdserve bench` flags (e.g. "
                   "\"--tokenizer DIR\" where the default model is not installed).")
    p.add_argument("--server-log-level", default="INFO",
                   help="`pdserve --log-level` of the servers (debug: the lane's time per stream).")
    p.add_argument("--log-dir", default="", help="Keep the servers' logs here.")
    p.add_argument("--output", default=f"bench/results/crossnode_cpu_{time.strftime('%Y-%m-%d')}")
    args = p.parse_args(argv)
    tb = netns.Testbed(args.name)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.log_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for rate in args.rates.split(","):
            where = None if rate == "loopback" else tb  # loopback: no testbed, 127.0.0.1
            if where is not None:
                link = None if rate == "unshaped" else netns.Link(netns.parse_rate(rate), 0.0)
                netns.up(link, tb)
            try:
                for placement in args.placements.split(","):
                    for extra in args.serve_args.split(";"):
                        for row in run_point(where, placement, args, workdir, extra.strip()):
                            row = {"link": rate, **row}
                            print(json.dumps(row), flush=True)
                            rows.append(row)
            finally:
                if where is not None:
                    netns.down(tb)
    command = "python -m bench.crossnode " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {"machine": report.machine(), "command": command, "note": args.note, "rows": rows}
    report.write_json(f"{args.output}.json", doc)
    lines = [f"# KV across a shaped link (bench/netns.py testbed), {time.strftime('%Y-%m-%d')}",
             "", f"Command: `{command}`", "", args.note, "",
             "| link | placement | serve args | input | TTFT p50 / p90 (ms) | "
             "KV per remote request (MiB) | KV seconds per remote request | remote / local |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['link']} | {r['placement']} | {r['serve_args'] or '-'} | "
                         f"{r['input_len']} | failed: {str(r['error'])[:80]!r} | | | |")
            continue
        lines.append(f"| {r['link']} | {r['placement']} | {r['serve_args'] or '-'} | "
                     f"{r['input_len']} | {r['ttft_p50_ms']:.0f} / "
                     f"{r['ttft_p90_ms']:.0f} | {r['kv_mib_per_remote_request']:.1f} | "
                     f"{r['kv_seconds_per_remote_request']:.3f} | "
                     f"{r.get('placed_remote', 0):.0f} / {r.get('placed_local', 0):.0f} |")
    lines += overlap_lines(rows) + tail_lines(rows) + phase_lines(rows)
    Path(f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[6:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
