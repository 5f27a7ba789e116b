"""Entry point of one worker process: `python -m deploy.worker_main --role decode ...`.

Started by the local launcher (deploy/local_launcher.py) or inside a Ray actor
(deploy/ray_launcher.py). Builds the engine (memory plan first, then weights), binds the
worker's sockets on `--host` (port 0: any free port), says Hello to the proxy and serves
until Shutdown, SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import signal
import sys
from types import FrameType

import torch

from deploy.args import add_dataclass_args, dataclass_from_args
from deploy.worker_base import WorkerBase, WorkerConfig
from engine.config import ConfigError, EngineConfig
from engine.errors import EngineError
from engine.llm_engine import LLMEngine
from transfer.errors import TransferError

log = logging.getLogger("pdserve.worker")


def apply_profile(config: EngineConfig, name: str | None) -> EngineConfig:
    """Cache dtype and layout from a GPU profile (transfer/profiles.py), e.g. 'volta', 'ampere'."""
    if not name:
        return config
    from engine.kv_layout import SUPPORTED_LAYOUTS
    from transfer.profiles import profile

    try:
        p = profile(name)
    except KeyError as e:
        raise ConfigError(str(e)) from None
    if p.layout not in SUPPORTED_LAYOUTS or p.dtype.value not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"profile {name}: the engine cannot run a {p.dtype.value} {p.layout.value} "
                          f"cache; use volta, ampere, ampere_sm86 or hopper")
    return dataclasses.replace(config, kv_cache_dtype=p.dtype.value, kv_cache_layout=p.layout.value)


def build_worker(role: str, worker_cfg: WorkerConfig, engine_cfg: EngineConfig) -> WorkerBase:
    engine = LLMEngine.from_config(engine_cfg)
    worker: WorkerBase
    if role == "decode":
        from decode.worker import DecodeWorker
        worker = DecodeWorker(worker_cfg, engine)
    else:
        from prefill.worker import PrefillWorker
        worker = PrefillWorker(worker_cfg, engine)
    # Start-up objects (model, tokenizer, sockets) leave the collector's scans: full
    # collections otherwise pause a KV transfer for ~50 ms every few requests.
    gc.freeze()
    return worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve-worker")
    parser.add_argument("--role", choices=["prefill", "decode"], required=True)
    parser.add_argument("--profile", default=None, help="GPU profile for the KV cache (transfer/profiles.py)")
    parser.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--log-level", default="INFO")
    add_dataclass_args(parser, EngineConfig)
    add_dataclass_args(parser, WorkerConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{args.role} {args.worker_id}] %(name)s: %(message)s")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    try:
        engine_cfg = apply_profile(dataclass_from_args(EngineConfig, args), args.profile)
        worker = build_worker(args.role, dataclass_from_args(WorkerConfig, args), engine_cfg)
    except (ConfigError, EngineError, TransferError) as e:
        log.error("cannot start: %s", e)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
