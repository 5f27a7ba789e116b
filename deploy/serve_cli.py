"""`pdserve serve`: flags from ServeConfig + EngineConfig; local processes or a Ray cluster.
`--max-restarts` applies to both: Ray restarts dead actors, the local launcher dead processes."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace

from deploy.local_launcher import LocalDeployment, ServeConfig, interrupt_on_sigterm
from deploy.ray_config import RayConfig
from deploy.worker_net import WorkerNetConfig
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
    try:
        serve = dataclass_from_args(ServeConfig, args)
    except ConfigError:
        raise
    except ValueError as e:  # the proxy's own configs (e.g. HttpLimits) cannot use ConfigError
        raise ConfigError(str(e)) from None
    engine = dataclass_from_args(EngineConfig, args)
    ray_config = dataclass_from_args(RayConfig, args)
    serve.check_tp(engine.tensor_parallel_size)
    if args.ray and serve.net != WorkerNetConfig():
        raise ConfigError("--prefill/--decode-host and -netns place local workers; on Ray each "
                          "worker binds its node's address")
    if args.ray:
        from deploy.ray_launcher import RayDeployment
        try:
            return RayDeployment(serve, engine, ray_config, args.log_level).run()
        except (RuntimeError, TimeoutError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if replace(ray_config, max_restarts=RayConfig.max_restarts) != RayConfig():
        raise ConfigError("the Ray flags (--address, --proxy-node, ...) need --ray")
    deployment = LocalDeployment(serve, engine, engine_args(args), ray_config.max_restarts)
    # SIGTERM stops the deployment as Ctrl-C does (before, it left the workers running: 16
    # orphans of ~1 GiB each took a 24 GiB VM to OOM on 2026-12-06)
    interrupt_on_sigterm()
    try:
        asyncio.run(deployment.serve_forever())
    except KeyboardInterrupt:
        deployment.stop_workers()
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
