"""Entry point of one worker process, shared by `python -m prefill ...` and `python -m decode ...`.

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
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

import torch

from engine.config import ConfigError, EngineConfig
from engine.errors import EngineError
from engine.llm_engine import LLMEngine
from engine.tp_launch import RankLauncher
from protocol.auth import SECRET_ENV, AuthError, load_secret
from transfer.wire.errors import TransferError
from worker.args import add_dataclass_args, dataclass_from_args
from worker.base import WorkerBase
from worker.config import WorkerConfig, parse_cpus
from worker.parent_watch import watch_parent
from worker.warmup import warm_up

log = logging.getLogger("pdserve.worker")


def apply_profile(config: EngineConfig, name: str | None) -> EngineConfig:
    """Cache dtype and layout from a GPU profile (transfer/convert/profiles.py), e.g. 'volta',
    'ampere'."""
    if not name:
        return config
    from engine.kv_layout import SUPPORTED_LAYOUTS
    from transfer.convert.profiles import profile

    try:
        p = profile(name)
    except KeyError as e:
        raise ConfigError(str(e)) from None
    if p.layout not in SUPPORTED_LAYOUTS or p.dtype.value not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"profile {name}: the engine cannot run a {p.dtype.value} "
                          f"{p.layout.value} cache; use volta, ampere, ampere_sm86 or hopper")
    return dataclasses.replace(config, kv_cache_dtype=p.dtype.value, kv_cache_layout=p.layout.value)


def _stop_orphan() -> None:
    """SIGTERM to itself: the default action (exit) while the engine loads, the clean stop
    once `main` has its handler installed."""
    log.warning("the launcher (parent process) is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)


WorkerClass = Callable[[WorkerConfig, LLMEngine], WorkerBase]


def refuse_tensor_parallel(engine: EngineConfig, worker: WorkerConfig) -> None:
    """A tensor-parallel worker's ranks exchange KV over the ZMQ transport (whole or layer-wise):
    NCCL pairs are not routed per rank yet."""
    tp = engine.tensor_parallel_size
    if tp == 1:
        return
    if worker.kv.transport != "zmq":
        raise ConfigError(f"--tensor-parallel-size {tp} with --transport {worker.kv.transport}: "
                          f"tensor-parallel workers send KV per rank over --transport zmq only")



def build_worker(worker_class: WorkerClass, worker_cfg: WorkerConfig,
                 engine_cfg: EngineConfig, rank_launcher: RankLauncher | None = None
                 ) -> WorkerBase:
    """Load the engine (memory plan first, then weights) and build one worker around it;
    `rank_launcher` starts its follower tensor-parallel ranks (default: local processes)."""
    refuse_tensor_parallel(engine_cfg, worker_cfg)
    if worker_cfg.cpu_affinity:
        os.sched_setaffinity(0, parse_cpus(worker_cfg.cpu_affinity))
    service = getattr(worker_class, "rank_service", None)
    engine = LLMEngine.from_config(engine_cfg,
                                   rank_service=service(worker_cfg) if service else None,
                                   rank_launcher=rank_launcher)
    if worker_cfg.warmup_s > 0:
        warm_up(engine, worker_cfg.warmup_s)
    worker = worker_class(worker_cfg, engine)
    # Start-up objects (model, tokenizer, sockets) leave the collector's scans: full
    # collections otherwise pause a KV transfer for ~50 ms every few requests.
    gc.freeze()
    return worker


def main(worker_class: WorkerClass, role: str, argv: list[str] | None = None) -> int:
    """Run one worker of `worker_class` until Shutdown, SIGTERM or Ctrl-C (`python -m prefill` and
    `python -m decode` call this with their role's class); 2 when it cannot start."""
    parser = argparse.ArgumentParser(prog=f"python -m {role}")
    parser.add_argument("--profile", default=None,
                        help="GPU profile for the KV cache (transfer/convert/profiles.py)")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="torch CPU threads (0 = torch default)")
    parser.add_argument("--log-level", default="INFO")
    add_dataclass_args(parser, EngineConfig)
    add_dataclass_args(parser, WorkerConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{role} {args.worker_id}] "
                               f"%(name)s: %(message)s")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    if args.exit_with_parent:
        watch_parent(_stop_orphan)
    try:
        engine_cfg = apply_profile(dataclass_from_args(EngineConfig, args), args.profile)
        secret = None if args.insecure_internal else load_secret(args.cluster_secret_file)
        os.environ.pop(SECRET_ENV, None)  # not inherited by what this process starts
        worker_cfg = dataclass_from_args(WorkerConfig, args, cluster_secret=secret)
        if worker_cfg.insecure_internal:
            log.warning("--insecure-internal: this worker's control and KV sockets accept anyone "
                        "who reaches them")
        worker = build_worker(worker_class, worker_cfg, engine_cfg)
    except (ConfigError, EngineError, TransferError, AuthError) as e:
        log.error("cannot start: %s", e)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.run()
    except EngineError as e:  # e.g. a tensor-parallel rank died: this worker is gone
        log.error("%s worker stops: %s", role, e)
        return 1
    finally:
        worker.close()
    return 0

