"""`pdserve serve`: flags from ServeConfig + EngineConfig; local processes or a Ray cluster."""

from __future__ import annotations

import argparse
import asyncio
import sys

from deploy.local_launcher import LocalDeployment, ServeConfig
from deploy.ray_config import RayConfig
from engine.config import ConfigError, EngineConfig
from worker.args import add_dataclass_args, dataclass_from_args


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="Serve the OpenAI API with prefill and decode workers.",
                       description="Serve the OpenAI API with prefill and decode workers.")
    add_dataclass_args(p, ServeConfig)
    add_dataclass_args(p, EngineConfig)
    p.add_argument("--ray", action="store_true",
                   help="Launch the proxy and workers as actors on a Ray cluster (flags below).")
    add_dataclass_args(p.add_argument_group("Ray (with --ray)"), RayConfig)  # type: ignore[arg-type]
    p.set_defaults(func=cmd_serve)


def engine_args(args: argparse.Namespace) -> list[str]:
    """The EngineConfig flags the user gave, to pass on to every worker process."""
    out = []
    for name, value in vars(args).items():
        if (name in EngineConfig.__dataclass_fields__ and value is not None
                and name not in ("extra", "device")):
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + name.replace("_", "-"))
            else:
                out += [flag, str(value)]
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    serve = dataclass_from_args(ServeConfig, args)
    engine = dataclass_from_args(EngineConfig, args)
    ray_config = dataclass_from_args(RayConfig, args)
    serve.check_tp(engine.tensor_parallel_size)
    if args.ray:
        if serve.tp_of("decode", engine.tensor_parallel_size) > 1:
            raise ConfigError("--tensor-parallel-size / --decode-tp: the Ray launcher does not "
                              "start tensor-parallel workers yet; run without --ray")
        from deploy.ray_launcher import RayDeployment
        try:
            return RayDeployment(serve, engine, ray_config, args.log_level).run()
        except (RuntimeError, TimeoutError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if ray_config != RayConfig():
        raise ConfigError("the Ray flags (--address, --max-restarts, --proxy-node, ...) need --ray")
    deployment = LocalDeployment(serve, engine, engine_args(args))
    try:
        asyncio.run(deployment.serve_forever())
    except KeyboardInterrupt:
        deployment.stop_workers()
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
