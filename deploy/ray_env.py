"""What every pdserve Ray actor (proxy, worker, tensor-parallel rank) sets up first: its log
lines, and where it runs (node, IP, host, pid) for the launcher's and `pdserve status`' views."""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any


def setup_actor_logging(level: str, tag: str) -> None:
    """Log lines of an actor go to its stderr, which Ray forwards to the driver's terminal."""
    root = logging.getLogger()
    if not any(getattr(h, "_pdserve", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{tag}] "
                                               f"%(name)s: %(message)s"))
        handler._pdserve = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())


def where_am_i() -> dict[str, Any]:
    """This actor's node id, node IP, host name and pid (the topology view's placement columns)."""
    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(), "pid": os.getpid()}
