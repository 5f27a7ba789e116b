"""What `pdserve serve --ray` adds to a local launch: where the cluster is, how workers are
placed (placement group strategy, role pinning by custom resource or node label), and how dead
workers come back. Pure data and functions: nothing here imports Ray, so the CLI and the tests
of placement rules run without it.

Names on the cluster (what `pdserve status` / `pdserve stop` look up): every deployment lives
in the Ray namespace `--deployment-name`; its actors are named `proxy`, `prefill-<i>`,
`decode-<i>` (a tensor-parallel worker's rank 0) and `<worker>-rank<r>` (its follower rank r),
its placement groups `<deployment-name>-workers` (the workers without tensor parallelism, placed
by `--placement-strategy`) and `<deployment-name>-workers/<worker>` (one per tensor-parallel
worker: a bundle per rank, STRICT_PACK, so that its ranks share a node).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from engine.config import ConfigError

PROXY_ACTOR = "proxy"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
TP_STRATEGY = "STRICT_PACK"
"""A tensor-parallel worker's ranks reach each other on 127.0.0.1: all its bundles on one node."""
RANK_ACTOR = re.compile(r"^(?P<worker>.+)-rank(?P<rank>[1-9][0-9]*)$")
ROLE_RESOURCE_AMOUNT = 0.001
"""How much of a role's custom resource one worker takes: enough to require the resource on its
node, little enough that the amount a node declares is a marker, not a count."""


@dataclass(frozen=True)
class RayConfig:
    address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join: the head's host:port, or auto "
                "(default: $RAY_ADDRESS, else auto)."})
    deployment_name: str = field(default="pdserve", metadata={
        "help": "Ray namespace holding this deployment's actors and placement group."})
    max_restarts: int = field(default=3, metadata={
        "help": "How often a dead worker is restarted (-1 = without limit): by Ray (also the "
                "proxy actor) with --ray, else by the local launcher."})
    proxy_node: str = field(default="head", metadata={
        "help": "Node that runs the proxy: head, a node id (or a unique prefix of one) "
                "or a node IP."})
    placement_strategy: str = field(default="PACK", metadata={
        "help": "Placement group strategy of the workers: PACK, SPREAD, STRICT_PACK or "
                "STRICT_SPREAD."})
    prefill_resource: str | None = field(default=None, metadata={
        "help": "Custom resource a node must have to run prefill workers "
                "(ray start --resources '{\"prefill\": 1}')."})
    decode_resource: str | None = field(default=None, metadata={
        "help": "Custom resource a node must have to run decode workers "
                "(ray start --resources '{\"decode\": 1}')."})
    prefill_label: str | None = field(default=None, metadata={
        "help": "Node label KEY=VALUE the prefill workers' nodes must carry (ray start --labels)."})
    decode_label: str | None = field(default=None, metadata={
        "help": "Node label KEY=VALUE the decode workers' nodes must carry (ray start --labels)."})
    cpus_per_worker: float = field(default=1.0, metadata={
        "help": "CPUs each worker actor reserves (also its torch threads on CPU)."})
    gpus_per_worker: float | None = field(default=None, metadata={
        "help": "GPUs each worker actor reserves (default: 1 if the cluster has GPUs and "
                "--device is not cpu, else 0)."})
    placement_timeout_s: float = field(default=120.0, metadata={
        "help": "How long to wait for the cluster to have room for every worker."})
    detach: bool = field(default=False, metadata={
        "help": "Start the deployment, print its URL and exit; `pdserve stop` removes it."})

    def __post_init__(self) -> None:
        strategy = self.placement_strategy.upper()
        if strategy not in STRATEGIES:
            raise ConfigError(f"--placement-strategy must be one of {', '.join(STRATEGIES)}, "
                              f"got {self.placement_strategy!r}")
        object.__setattr__(self, "placement_strategy", strategy)
        if self.max_restarts < -1:
            raise ConfigError(f"--max-restarts must be -1 (no limit) or more, "
                              f"got {self.max_restarts}")
        if self.cpus_per_worker < 0 or (self.gpus_per_worker or 0) < 0:
            raise ConfigError("--cpus-per-worker and --gpus-per-worker cannot be negative")
        if not self.deployment_name or "/" in self.deployment_name:
            raise ConfigError(f"--deployment-name must be a non-empty name without '/', "
                              f"got {self.deployment_name!r}")
        for role in ("prefill", "decode"):
            self.role_label(role)  # validates KEY=VALUE

    @property
    def placement_group_name(self) -> str:
        return f"{self.deployment_name}-workers"

    def worker_placement_group_name(self, worker_id: str) -> str:
        """The placement group of one tensor-parallel worker (deployment names hold no '/')."""
        return f"{self.placement_group_name}/{worker_id}"

    def is_own_placement_group(self, name: str) -> bool:
        return name == self.placement_group_name or name.startswith(
            self.placement_group_name + "/")

    def role_resource(self, role: str) -> str | None:
        return self.prefill_resource if role == "prefill" else self.decode_resource

    def role_label(self, role: str) -> dict[str, str]:
        text = self.prefill_label if role == "prefill" else self.decode_label
        if not text:
            return {}
        key, sep, value = text.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--{role}-label must look like KEY=VALUE (e.g. role={role}), "
                              f"got {text!r}")
        return {key.strip(): value.strip()}

    def worker_bundle(self, role: str, num_gpus: float) -> dict[str, float]:
        """Resources of one worker's placement-group bundle (and of the actor placed in it); a
        tensor-parallel worker has one such bundle per rank, each holding that rank's actor."""
        bundle: dict[str, float] = {}
        if self.cpus_per_worker:
            bundle["CPU"] = self.cpus_per_worker
        if num_gpus:
            bundle["GPU"] = num_gpus
        resource = self.role_resource(role)
        if resource:
            bundle[resource] = ROLE_RESOURCE_AMOUNT
        if not bundle:
            raise ConfigError(f"a {role} worker would reserve nothing: give --cpus-per-worker, "
                              f"--gpus-per-worker or --{role}-resource")
        return bundle


def rank_actor_name(worker_id: str, rank: int) -> str:
    """The Ray actor name of a tensor-parallel worker's follower rank (rank 0 is the worker)."""
    return f"{worker_id}-rank{rank}"


def rank_of_actor(name: str) -> tuple[str, int] | None:
    """(worker id, rank) of a follower rank actor's name; None for any other actor."""
    m = RANK_ACTOR.match(name)
    return (m["worker"], int(m["rank"])) if m else None


def resolve_node(nodes: list[dict[str, Any]], spec: str) -> str:
    """The id of the alive node that `spec` names: `head`, a node id or unique prefix, or an IP.

    `nodes` is `ray.nodes()`. Raises ConfigError listing the alive nodes when nothing (or more
    than one node) matches.
    """
    alive = [n for n in nodes if n.get("Alive")]
    if spec == "head":
        found = [n for n in alive if "node:__internal_head__" in n.get("Resources", {})]
    else:
        found = [n for n in alive if n["NodeID"] == spec]
        found = found or [n for n in alive if n["NodeManagerAddress"] == spec]
        found = found or [n for n in alive if len(spec) >= 6 and n["NodeID"].startswith(spec)]
    if len(found) == 1:
        return found[0]["NodeID"]
    listing = ", ".join(f"{n['NodeID'][:12]} ({n['NodeManagerAddress']})" for n in alive)
    what = "no alive node" if not found else f"{len(found)} nodes"
    raise ConfigError(f"--proxy-node {spec!r} matches {what}; give a node id instead. "
                      f"Alive nodes: {listing}")
