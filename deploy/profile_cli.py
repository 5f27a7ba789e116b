"""`pdserve profile`: measure the model on this device and write the planner's profile JSON.

    pdserve profile --out profile.json --budget-s 120 [--model ... --device cuda ...]

Measurement is deploy/profiler.py; the file's schema is planner/profile.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

from engine.config import ConfigError, EngineConfig
from worker.args import add_dataclass_args, dataclass_from_args


def add_profile_parser(sub: argparse._SubParsersAction) -> None:
    text = "Measure step times, KV size and transfer rates on this device for `plan cluster`."
    p = sub.add_parser("profile", help=text, description=text)
    p.add_argument("--out", default="profile.json", help="Profile JSON to write.")
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="Seconds of measurement after the model is loaded (default 120).")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: 1 on CPU, as a pinned worker runs; torch's "
                        "default on CUDA).")
    p.add_argument("--cpu-core", type=int, default=None,
                   help="Pin this process to one core (as --cpu-affinity pins a worker).")
    p.add_argument("--no-transfers", action="store_true",
                   help="Skip the KV transfer measurements.")
    add_dataclass_args(p, EngineConfig)
    p.set_defaults(func=cmd_profile)


def given_engine_args(config: EngineConfig) -> list[str]:
    """The EngineConfig flags that differ from their defaults (for the serve command)."""
    out = []
    for f in fields(EngineConfig):
        value = getattr(config, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if f.name in ("device",) or value == default or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        out += ([flag] if value is True else [f"--no-{f.name.replace('_', '-')}"]
                if value is False else [flag, str(value)])
    return out


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from deploy.profiler import Budget, Profiler, log_stderr, measure_transfers
    from engine.llm_engine import LLMEngine
    from planner.profile import EngineLimits, Profile

    if args.budget_s <= 0:
        raise ConfigError(f"--budget-s must be > 0, got {args.budget_s}")
    if args.cpu_core is not None:
        os.sched_setaffinity(0, {args.cpu_core})
    config = dataclass_from_args(EngineConfig, args)
    is_cuda = config.torch_device.type == "cuda"
    threads = args.threads or (0 if is_cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    engine = LLMEngine.from_config(config)
    log_stderr(f"model loaded in {time.perf_counter() - t0:.1f} s; measuring for "
               f"{args.budget_s:.0f} s")
    budget = Budget(args.budget_s, log_stderr)
    prof = Profiler(engine, budget)
    prof._run([prof._prompt(32)], 4)  # warm-up: first-call costs stay out of the points
    prof.steps.clear()
    prefill, chunked, decode, mixed = prof.prefill(), prof.chunked(), prof.decode(), prof.mixed()
    num_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    transfers = ({"stream": "not measured (--no-transfers)"} if args.no_transfers
                 else measure_transfers(budget, num_cuda))
    mc, plan = engine.model_config, engine.plan
    device = (torch.cuda.get_device_name(config.torch_device) if is_cuda
              else f"{platform.processor() or platform.machine()} CPU, {threads} thread(s)"
                   + (f", pinned to core {args.cpu_core}" if args.cpu_core is not None else ""))
    meta = {"device": device, "model": config.model, "load_format": config.load_format,
            "model_shape": {k: getattr(mc, k) for k in (
                "architecture", "num_layers", "hidden_size", "intermediate_size", "num_heads",
                "num_kv_heads", "head_dim", "vocab_size")},
            "dtype": str(config.torch_dtype).removeprefix("torch."),
            "kv_dtype": str(config.kv_torch_dtype).removeprefix("torch."),
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "pdserve": _version()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host_cpus": os.cpu_count(),
            "load_avg": os.getloadavg(), "budget_s": args.budget_s,
            "measured_s": round(budget.elapsed, 1),
            "command": "pdserve profile " + " ".join(sys.argv[2:]),
            "engine_args": given_engine_args(config)}
    profile = Profile(
        EngineLimits(config.max_num_batched_tokens, config.max_num_seqs, config.block_size,
                     plan.num_tokens, plan.max_model_len),
        float(plan.spec.bytes_per_token), prefill, decode, chunked, mixed, transfers,
        [[s.seconds, s.num_prefill_tokens, s.num_decode_seqs, s.num_context_tokens]
         for s in prof.steps], meta)
    Path(args.out).write_text(profile.to_json())
    log_stderr(f"profile: {args.out} ({len(prefill)} prefill, {len(chunked)} chunked, "
               f"{len(decode)} decode, {len(mixed)} mixed points; {budget.elapsed:.0f} s)")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "unknown"
