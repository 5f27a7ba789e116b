"""`pdserve bench` (one workload against a running server) and `pdserve bench sweep` (the
workload at several rates against several server configurations, goodput of each).

Flags of the workload come from `DatasetConfig` and `LoadConfig` (bench/); everything else
lives in bench/ — this module only parses, resolves the tokenizer and writes the outputs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.datasets import DatasetConfig, TextTokenizer, build_dataset, load_tokenizer
from bench.loadgen import LoadConfig, default_endpoint, fetch_model, make_client, run_load
from bench.metrics import Slo, Summary, summarize
from bench.sweep import (
    ConfigResult,
    ServerSpec,
    SweepPlan,
    format_tables,
    plot_sweep,
    run_sweep,
    serve_cmd,
)
from worker.args import add_dataclass_args, dataclass_from_args, parse_seconds

WARMUP_SEED_OFFSET = 10_007


def parse_rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(sorted(float(x) for x in text.split(",") if x.strip()))
    except ValueError:
        rates = ()
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"expected rates like 0.5,1,2 (req/s, > 0), "
                                         f"got {text!r}")
    return rates


def _add_workload_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    add_dataclass_args(p, DatasetConfig)
    add_dataclass_args(p, LoadConfig, skip=skip)
    p.add_argument("--tokenizer", default=None,
                   help="Tokenizer that sizes prompts: a tokenizer.json, or a pdserve --model "
                        "value (smollm2, .gguf, HF dir); 'none' = 1 word per token "
                        "(default: the served model).")
    p.add_argument("--slo-ttft", type=parse_seconds, default=1.0,
                   help="TTFT target, seconds (0.5, 500ms) (default: 1s).")
    p.add_argument("--slo-tpot", type=parse_seconds, default=0.1,
                   help="TPOT target, seconds (default: 100ms).")
    p.add_argument("--slo-attainment", type=float, default=0.9,
                   help="Fraction of requests that must meet both targets "
                        "(default: 0.9, DistServe's).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    desc = ("Benchmark an OpenAI-compatible server: Poisson or fixed-concurrency load, streaming; "
            "TTFT/TPOT/ITL/e2e, throughput, SLO attainment and goodput.")
    p = sub.add_parser("bench", help="Benchmark a running server (and `bench sweep`).",
                       description=desc)
    _add_workload_args(p)
    p.add_argument("--warmup", type=int, default=0,
                   help="Warm-up requests before measuring (default: 0).")
    p.add_argument("--result-file", default=None,
                   help="JSON result file (default: pdserve-bench-DATE-TIME.json).")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="Write latency CDFs (default path: the result file's, .png). "
                        "Needs matplotlib.")
    p.add_argument("--detailed", action="store_true",
                   help="Keep every inter-token latency in the JSON.")
    p.set_defaults(func=cmd_bench)

    bsub = p.add_subparsers(dest="bench_command", metavar="{sweep}")
    s = bsub.add_parser("sweep",
                        help="One workload at several rates against several configurations.",
                        description="Run the workload at each --request-rates value against each "
                                    "--url / --config and report the goodput of each.")
    _add_workload_args(s, skip=("base_url", "request_rate"))
    s.add_argument("--request-rates", type=parse_rates, required=True,
                   help="Comma-separated req/s, e.g. 0.5,1,2.")
    s.add_argument("--url", action="append", default=[], metavar="NAME=URL",
                   help="A running server to include (repeatable).")
    s.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS",
                   help="`pdserve serve` flags of a configuration the sweep starts itself, e.g. "
                        "1p1d='--prefill 1 --decode 1' (repeatable).")
    s.add_argument("--serve-args", default="", help="Flags given to every started server, e.g. "
                   "'--kv-cache-memory 256MiB --max-model-len 2048'.")
    s.add_argument("--warmup", type=int, default=2,
                   help="Warm-up requests per configuration (default: 2).")
    s.add_argument("--stop-below", type=float, default=0.0,
                   help="Skip a config's higher rates once its attainment falls below this "
                        "(default: 0, never).")
    s.add_argument("--startup-timeout", type=float, default=300.0,
                   help="Seconds for a server to start.")
    s.add_argument("--output", default=None,
                   help="Output prefix: writes PREFIX.json, PREFIX.md, PREFIX.png "
                        "(default: sweep-DATE-TIME).")
    s.add_argument("--log-dir", default=None,
                   help="Where started servers' logs go (default: a new temp dir).")
    s.add_argument("--server-log-level", default=None,
                   choices=("debug", "info", "warning", "error"),
                   help="`pdserve --log-level` of the started servers (default: pdserve's); "
                        "debug logs every engine step and placement, which "
                        "`python -m bench.serving_trace` reads beside the sweep's JSON.")
    s.add_argument("--note", default="",
                   help="Text added to the JSON and under the Markdown tables.")
    s.set_defaults(func=cmd_sweep)


def _configs(args: argparse.Namespace) -> tuple[DatasetConfig, LoadConfig, Slo]:
    for name in ("httpx", "httpcore"):  # one INFO line per request would bury the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        dataset = dataclass_from_args(DatasetConfig, args)
        load = dataclass_from_args(LoadConfig, args)
        slo = Slo(args.slo_ttft, args.slo_tpot, args.slo_attainment)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if load.endpoint is None:
        load = dataclasses.replace(load, endpoint=default_endpoint(dataset.dataset))
    return dataset, load, slo


def resolve_tokenizer(spec: str | None,
                      candidates: list[str]) -> tuple[TextTokenizer | None, str]:
    """The tokenizer named by --tokenizer, else the first candidate (model names) that loads;
    (None, why) means prompts are sized at one word per token."""
    if spec and spec.lower() == "none":
        return None, "none (1 word ~ 1 token)"
    for name in [spec] if spec else candidates:
        try:
            return load_tokenizer(name), name
        except ValueError as e:
            if spec:
                raise SystemExit(f"error: --tokenizer: {e}") from None
    return None, "none (no local tokenizer for the served model; 1 word ~ 1 token)"


async def _served_model(load: LoadConfig) -> str:
    async with make_client(load) as client:
        return load.model or await fetch_model(client)


def _run_doc(kind: str, dataset: DatasetConfig, load: LoadConfig, slo: Slo,
             tokenizer: str) -> dict[str, Any]:
    return {"kind": kind, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": report.machine(), "command": shlex.join(["pdserve", *sys.argv[1:]]),
            "dataset": dataclasses.asdict(dataset),
            "load": {k: v for k, v in dataclasses.asdict(load).items() if k != "api_key"},
            "slo": dataclasses.asdict(slo), "tokenizer": tokenizer}


def cmd_bench(args: argparse.Namespace) -> int:
    dataset, load, slo = _configs(args)
    try:
        model = asyncio.run(_served_model(load))
    except Exception as e:
        raise SystemExit(f"error: cannot reach {load.root_url}/v1/models: "
                         f"{type(e).__name__}: {e}") from None
    load = dataclasses.replace(load, model=model)
    tokenizer, tok_name = resolve_tokenizer(args.tokenizer, [model])
    requests = build_dataset(dataset, tokenizer, load.seed)
    endpoint = load.endpoint or "completions"
    print(f"pdserve bench: {len(requests)} {dataset.dataset} requests -> {load.root_url} "
          f"({endpoint}, model {model}, rate {load.request_rate:g} req/s, "
          f"max concurrency {load.max_concurrency or 'unbounded'}, tokenizer {tok_name})",
          file=sys.stderr)
    if args.warmup:
        warm = build_dataset(dataclasses.replace(dataset, num_prompts=args.warmup), tokenizer,
                             load.seed + WARMUP_SEED_OFFSET)
        serial = dataclasses.replace(load, request_rate=math.inf, max_concurrency=1)
        asyncio.run(run_load(serial, warm, endpoint))
    progress = report.Progress(len(requests), enabled=not args.no_progress)
    try:
        run = asyncio.run(run_load(load, requests, endpoint, on_result=progress.update))
    finally:
        progress.close()
    summary = summarize(run.results, run.duration_s, slo)
    print(report.format_summary(summary))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(args.result_file or f"pdserve-bench-{stamp}.json")
    doc = {**_run_doc("bench", dataset, load, slo, tok_name), "endpoint": endpoint, "model": model,
           "summary": summary.to_dict(), "started_at": run.started_at,
           "requests": [r.to_dict(args.detailed) for r in run.results]}
    print(f"results: {report.write_json(path, report.clean_floats(doc))}")
    if args.plot is not None:
        png = Path(args.plot) if args.plot else path.with_suffix(".png")
        try:
            title = (f"{model} @ {load.request_rate:g} req/s "
                     f"({dataset.dataset}, {len(requests)} requests)")
            print(f"plot: {report.plot_cdfs(run.results, png, title, slo.ttft_s, slo.tpot_s)}")
        except RuntimeError as e:
            print(f"plot skipped: {e}", file=sys.stderr)
    return 0 if summary.num_ok else 1


def _flag_value(flags: list[str], name: str) -> str | None:
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            return flags[i + 1]
        if flag.startswith(name + "="):
            return flag.split("=", 1)[1]
    return None


def _sweep_specs(args: argparse.Namespace) -> list[ServerSpec]:
    try:
        specs = ([ServerSpec.parse(u, is_url=True) for u in args.url]
                 + [ServerSpec.parse(c, is_url=False) for c in args.config])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not specs:
        raise SystemExit("error: give at least one --url NAME=URL or --config NAME=FLAGS")
    if len({s.name for s in specs}) != len(specs):
        raise SystemExit("error: configuration names must be unique")
    return specs


def _sweep_tokenizer(args: argparse.Namespace, specs: list[ServerSpec], common: list[str],
                     load: LoadConfig) -> tuple[TextTokenizer | None, str]:
    """--tokenizer, else the --model of the started servers (pdserve's default: smollm2), else
    the model a given URL serves."""
    candidates = [m for m in [_flag_value(common, "--model")] if m]
    if any(s.flags for s in specs):
        candidates.append(_flag_value([f for s in specs for f in s.flags], "--model") or "smollm2")
    for s in specs:
        if s.url and not candidates:
            with contextlib.suppress(Exception):
                served = dataclasses.replace(load, base_url=s.url)
                candidates.append(asyncio.run(_served_model(served)))
    return resolve_tokenizer(args.tokenizer, candidates)


def _on_point(name: str, rate: float, run: Any, s: Summary) -> None:
    ttft = s.ttft.p90 * 1000 if s.ttft else math.nan
    tpot = s.tpot.p90 * 1000 if s.tpot else math.nan
    print(f"[{name} @ {rate:g} req/s] attainment {s.attainment:.0%}, TTFT p90 {ttft:.0f} ms, "
          f"TPOT p90 {tpot:.0f} ms, {s.num_ok}/{s.num_requests} ok in {s.duration_s:.1f} s",
          file=sys.stderr, flush=True)


def _write_sweep(prefix: Path, doc: dict[str, Any], tables: str, results: list[ConfigResult],
                 slo: Slo, title: str) -> list[Path]:
    written = [report.write_json(prefix.with_suffix(".json"), report.clean_floats(doc))]
    m = doc["machine"]
    env = " ".join(f"{k}={v}" for k, v in m.get("env", {}).items())
    header = (f"# pdserve bench sweep, {doc['date']}\n\n"
              f"Machine: {m['processor']}, {m['cpus']} CPUs, "
              f"{m['platform']}, Python {m['python']}\n\n"
              f"Command: `{(env + ' ') if env else ''}{doc['command']}`\n\n")
    note = f"\n{doc['note']}\n" if doc.get("note") else ""
    prefix.with_suffix(".md").write_text(header + tables + "\n" + note)
    written.append(prefix.with_suffix(".md"))
    try:
        written.append(plot_sweep(results, slo, prefix.with_suffix(".png"), title))
    except RuntimeError as e:
        print(f"plot skipped: {e}", file=sys.stderr)
    return written


def cmd_sweep(args: argparse.Namespace) -> int:
    dataset, load, slo = _configs(args)
    specs = _sweep_specs(args)
    common = shlex.split(args.serve_args)
    tokenizer, tok_name = _sweep_tokenizer(args, specs, common, load)
    rates = args.request_rates
    warmup = build_dataset(dataclasses.replace(dataset, num_prompts=args.warmup), tokenizer,
                           load.seed + WARMUP_SEED_OFFSET) if args.warmup else []
    requests = tuple(tuple(build_dataset(dataset, tokenizer, load.seed + i))
                     for i in range(len(rates)))
    plan = SweepPlan(rates=rates, endpoint=load.endpoint or "completions", slo=slo,
                     stop_below=args.stop_below, requests=requests, warmup=tuple(warmup))
    prefix = Path(args.output or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    log_dir = None
    if any(s.flags for s in specs):
        log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdserve-sweep-"))
        log_dir.mkdir(parents=True, exist_ok=True)
    print(f"pdserve bench sweep: {len(specs)} config(s) x "
          f"rates {', '.join(f'{r:g}' for r in rates)} req/s, "
          f"{dataset.num_prompts} {dataset.dataset} requests each, tokenizer {tok_name}"
          + (f"; server logs in {log_dir}" if log_dir else ""), file=sys.stderr)
    results = run_sweep(specs, load, plan, serve_cmd=serve_cmd(args.server_log_level),
                        common_flags=common,
                        startup_timeout_s=args.startup_timeout, log_dir=log_dir,
                        on_point=_on_point,
                        progress=lambda total, desc: report.Progress(total, not args.no_progress,
                                                                     desc))
    tables = format_tables(results, slo)
    print(tables)
    doc = {**_run_doc("sweep", dataset, load, slo, tok_name), "request_rates": list(rates),
           "serve_args": args.serve_args, "note": args.note,
           "configs": [c.to_dict(slo.attainment) for c in results]}
    title = (f"{dataset.dataset}, {dataset.num_prompts} requests per point; "
             f"SLO TTFT <= {slo.ttft_s * 1000:g} ms, TPOT <= {slo.tpot_s * 1000:g} ms")
    written = _write_sweep(prefix, doc, tables, results, slo, title)
    print("results: " + ", ".join(map(str, written)))
    return 0 if any(c.points for c in results) else 1
