"""Where each role's workers live on the network: their bind address and, optionally, a Linux
network namespace to start them in.

This is what makes a cross-node deployment reproducible on one machine (bench/netns.py builds two
namespaces joined by a shaped veth link): `--decode-netns pdserve-b --decode-host 10.77.0.2`
starts every decode worker with `ip netns exec pdserve-b` and binds its sockets on the far end of
the link, so KV, control and events cross the shaped link exactly as they would cross a network.
Empty values keep today's behaviour (workers in the launcher's namespace, bound on
`--internal-host`; the proxy's event socket binds there too, so give the launcher's side of the
link as `--internal-host`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import ConfigError

NETNS_DIR = Path("/var/run/netns")  # where `ip netns add` puts named namespaces


@dataclass(frozen=True)
class WorkerNetConfig:
    prefill_host: str = field(default="", metadata={
        "help": "Bind address of the prefill workers' sockets (default: --internal-host)."})
    decode_host: str = field(default="", metadata={
        "help": "Bind address of the decode workers' sockets (default: --internal-host)."})
    prefill_netns: str = field(default="", metadata={
        "help": "Start prefill workers inside this network namespace (`ip netns exec`; root "
                "only; see bench/netns.py)."})
    decode_netns: str = field(default="", metadata={
        "help": "Start decode workers inside this network namespace (`ip netns exec`; root "
                "only; see bench/netns.py)."})

    def __post_init__(self) -> None:
        for flag, name in (("--prefill-netns", self.prefill_netns),
                           ("--decode-netns", self.decode_netns)):
            if not name:
                continue
            if "/" in name or name in (".", ".."):
                raise ConfigError(f"{flag} must be a namespace name, got {name!r}")
            if not (NETNS_DIR / name).exists():
                raise ConfigError(f"{flag}: no network namespace {name!r} (create it with "
                                  f"`ip netns add {name}` or `python -m bench.netns up`)")
            if os.geteuid() != 0:
                raise ConfigError(f"{flag} needs root (`ip netns exec` enters the namespace)")

    def host(self, role: str, default: str) -> str:
        return (self.prefill_host if role == "prefill" else self.decode_host) or default

    def prefix(self, role: str) -> list[str]:
        """What to put before a worker's command line so it starts in its namespace."""
        ns = self.prefill_netns if role == "prefill" else self.decode_netns
        return ["ip", "netns", "exec", ns] if ns else []
