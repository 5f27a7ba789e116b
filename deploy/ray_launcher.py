"""`pdserve serve --ray`: the same deployment as the local launch, on the nodes of a Ray cluster.

Start-up order (each step fails with what to do next):
1. check the KV plan (before any weight is read anywhere);
2. join the cluster (`--address`), in the namespace `--deployment-name`; refuse if a deployment
   of that name is already running;
3. start the proxy actor on the head node (or `--proxy-node`) and bind its event socket on that
   node's IP (deploy/ray_proxy.py);
4. reserve one placement-group bundle per worker (`--placement-strategy`, role pinning by
   `--prefill-resource`/`--decode-resource` or `--prefill-label`/`--decode-label`), and for a
   tensor-parallel worker a group of its own with one bundle per rank, STRICT_PACK (its ranks
   share a node); then start one worker actor per worker (deploy/ray_worker.py; a TP worker's
   is rank 0, which starts one actor per other rank: deploy/ray_ranks.py); each binds its
   sockets on its node's IP and says Hello to the proxy;
5. wait for every Hello, start HTTP, print the URL and where each worker runs.

Then it watches the proxy until Ctrl-C / SIGTERM (or `pdserve stop`), and removes the actors and
the placement groups. With `--detach` it exits after step 5 and `pdserve stop` removes them.
Dead workers are Ray's to restart (`--max-restarts`); the proxy fails their in-flight requests
and routes to them again once they say Hello. A dead proxy is restarted the same way and
recovers on its own (deploy/ray_proxy.py); the launcher waits for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from typing import Any

from deploy.local_launcher import ServeConfig, cluster_secret, interrupt_on_sigterm
from deploy.ray_config import PROXY_ACTOR, TP_STRATEGY, RayConfig, resolve_node
from engine.checkpoint import read_model_config
from engine.config import ConfigError, EngineConfig
from engine.memory_plan import plan_kv_cache
from worker.config import WorkerConfig
from worker.main import apply_profile

log = logging.getLogger("pdserve.ray")
FORWARDED_ENV_PREFIXES = ("NCCL_",)
"""Variables set where `pdserve serve --ray` runs that every worker actor gets too."""


def connect(address: str | None, namespace: str, log_to_driver: bool = True,
            start_local: bool = False) -> Any:
    """Join the Ray cluster at `address` (None: $RAY_ADDRESS, else auto) as a driver. With
    `start_local`, no address given and no cluster running, start a local one (as a bare
    `ray.init()` does; it stops when this process exits) and say so."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # keep every worker's log lines
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no escape codes in log files
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray on this machine and every node: "
                          "pip install 'pdserve[ray]'") from None
    is_auto = not (address or os.environ.get("RAY_ADDRESS"))
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=log_to_driver,
                 logging_level=logging.WARNING)
    except (ConnectionError, ValueError) as e:
        if start_local and is_auto and isinstance(e, ConnectionError):
            return _start_local(ray, namespace, log_to_driver)
        raise ConfigError(f"cannot join the Ray cluster at {address!r}: {e}. Start one with "
                          f"`ray start --head` (then `ray start --address HEAD:6379` on the other "
                          f"nodes) and pass --address HEAD:6379") from None
    return ray


def _start_local(ray: Any, namespace: str, log_to_driver: bool) -> Any:
    ray.init(namespace=namespace, log_to_driver=log_to_driver, logging_level=logging.WARNING,
             include_dashboard=False)
    res = ray.cluster_resources()
    print(f"pdserve: no Ray cluster is running: started a local one on this machine "
          f"({int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs); it stops when "
          f"pdserve exits. For several nodes run `ray start --head` and pass --address.",
          flush=True)
    return ray


def remove_deployment(ray: Any, config: RayConfig, timeout_s: float = 10.0) -> list[str]:
    """Stop the proxy gracefully (workers get Shutdown), kill every actor of the deployment's
    namespace and remove its placement groups. Returns the names of the actors removed."""
    from ray.util.placement_group import get_placement_group, remove_placement_group

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == config.deployment_name]
    handles = {}
    for name in names:
        with contextlib.suppress(ValueError):
            handles[name] = ray.get_actor(name, namespace=config.deployment_name)
    if PROXY_ACTOR in handles:
        with contextlib.suppress(Exception):
            ray.get(handles[PROXY_ACTOR].shutdown.remote(), timeout=timeout_s)
    for handle in handles.values():
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)
    table = {}
    with contextlib.suppress(Exception):
        table = ray.util.placement_group_table()
    names = {pg.get("name", "") for pg in table.values() if pg.get("state") != "REMOVED"}
    for name in sorted(n for n in names if config.is_own_placement_group(n)):
        with contextlib.suppress(Exception):
            remove_placement_group(get_placement_group(name))
    from deploy.ray_proxy import clear_state

    clear_state(config.deployment_name)
    return sorted(handles)


class RayDeployment:
    def __init__(self, serve: ServeConfig, engine: EngineConfig, config: RayConfig,
                 log_level: str = "INFO") -> None:
        self.serve, self.engine, self.config, self.log_level = serve, engine, config, log_level
        self.ray: Any = None
        self.proxy: Any = None
        self.workers: dict[str, Any] = {}
        self.engines: dict[str, EngineConfig] = {}  # per role, GPU profile applied
        # handed to the actors as arguments (Ray's own channel), never on a command line
        self.secret = cluster_secret(serve)

    def run(self) -> int:
        plan = plan_kv_cache(read_model_config(self.engine.model), self.engine)  # fails fast
        self.engines = {role: dataclasses.replace(
            apply_profile(self.engine, profile),
            tensor_parallel_size=self.serve.tp_of(role, self.engine.tensor_parallel_size))
            for role, profile in (("prefill", self.serve.prefill_profile),
                                  ("decode", self.serve.decode_profile))}
        interrupt_on_sigterm()
        self.ray = connect(self.config.address, self.config.deployment_name,
                           start_local=not self.config.detach)
        is_up = False
        try:
            self._claim_name(plan.max_model_len)  # from here on, the namespace's actors are ours
        except BaseException:
            self.ray.shutdown()
            raise
        try:
            events_address = self._start_proxy()
            self._start_workers(events_address)
            placement = self._wait_for_workers()
            url = self.ray.get(self.proxy.start_http.remote(), timeout=60)
            self._print_ready(url, placement)
            is_up = True
            if self.config.detach:
                return 0
            return self._watch()
        except KeyboardInterrupt:
            return 0
        finally:
            if not (is_up and self.config.detach):
                removed = remove_deployment(self.ray, self.config)
                log.info("removed %d actor(s) and the placement groups of %r", len(removed),
                         self.config.deployment_name)
            self.ray.shutdown()

    # ---- steps ---------------------------------------------------------------------------------
    def _claim_name(self, max_model_len: int) -> None:
        """Create the named proxy actor, or fail without touching a running deployment."""
        name = self.config.deployment_name
        already = ConfigError(f"a deployment named {name!r} is already running on this cluster: "
                              f"`pdserve status --deployment-name {name}` shows it, `pdserve stop "
                              f"--deployment-name {name}` removes it; "
                              f"or pick another --deployment-name")
        if PROXY_ACTOR in self.ray.util.list_named_actors():  # this namespace's
            raise already
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from deploy.ray_proxy import ProxyActor

        node_id = resolve_node(self.ray.nodes(), self.config.proxy_node)
        try:
            self.proxy = self.ray.remote(ProxyActor).options(
                name=PROXY_ACTOR, lifetime=self._lifetime(), num_cpus=0,
                max_restarts=self.config.max_restarts, max_concurrency=8,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self.serve, self.engine.model, max_model_len, self.log_level, self.secret)
        except ValueError:  # another launcher took the name in between
            raise already from None

    def _lifetime(self) -> str | None:
        return "detached" if self.config.detach else None

    def _start_proxy(self) -> str:
        info = self.ray.get(self.proxy.start_cluster.remote(), timeout=self.serve.startup_timeout_s)
        log.info("proxy on node %s (%s), events %s", info["node_id"][:12], info["node_ip"],
                 info["events_address"])
        return info["events_address"]

    def _num_gpus(self) -> float:
        if self.config.gpus_per_worker is not None:
            return self.config.gpus_per_worker
        has_gpus = self.ray.cluster_resources().get("GPU", 0) > 0
        return 1.0 if has_gpus and self.engine.device != "cpu" else 0.0

    def _runtime_env(self) -> dict[str, Any] | None:
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        if env:
            log.info("passing %s to every worker", ", ".join(sorted(env)))
        return {"env_vars": env} if env else None

    def _placement_groups(self, roles: list[tuple[str, str]], num_gpus: float
                          ) -> dict[str, tuple[Any, int]]:
        """Reserve every worker's place; by worker id, its group and its (rank 0's) bundle.
        Workers without TP share one group (`--placement-strategy`); each tensor-parallel
        worker gets its own, a bundle per rank, STRICT_PACK (its ranks meet on 127.0.0.1)."""
        from ray.util.placement_group import placement_group

        plain = [(role, wid) for role, wid in roles if self.engines[role].tensor_parallel_size == 1]
        wanted: list[tuple[str, list[str], list[dict[str, float]], str]] = []  # name, wids, ...
        if plain:
            wanted.append((self.config.placement_group_name, [wid for _, wid in plain],
                           [self.config.worker_bundle(role, num_gpus) for role, _ in plain],
                           self.config.placement_strategy))
        for role, wid in roles:
            tp = self.engines[role].tensor_parallel_size
            if tp > 1:
                wanted.append((self.config.worker_placement_group_name(wid), [wid],
                               [self.config.worker_bundle(role, num_gpus)] * tp, TP_STRATEGY))
        role_of = dict((wid, role) for role, wid in roles)
        groups: dict[str, tuple[Any, int]] = {}
        pending = []
        for name, wids, bundles, strategy in wanted:
            labels = [self.config.role_label(role_of[w]) for w in wids]
            if strategy == TP_STRATEGY and len(wids) == 1:
                labels = labels * len(bundles)
            extra = {"bundle_label_selector": labels} if any(labels) else {}
            try:
                pg = placement_group(bundles, strategy=strategy, name=name,
                                     lifetime=self._lifetime(), **extra)
            except TypeError:
                raise ConfigError(f"--prefill-label/--decode-label need Ray >= 2.49 (this is "
                                  f"{self.ray.__version__}); pin roles with --*-resource "
                                  f"instead") from None
            groups.update({wid: (pg, i) for i, wid in enumerate(wids)})
            pending.append((pg, wids, bundles, strategy, labels))
        deadline = time.monotonic() + self.config.placement_timeout_s
        no_room = []
        for pg, wids, bundles, strategy, labels in pending:
            try:
                self.ray.get(pg.ready(), timeout=max(0.1, deadline - time.monotonic()))
            except self.ray.exceptions.GetTimeoutError:
                no_room.append(self._no_room(wids, bundles, strategy, labels))
        if no_room:
            raise RuntimeError("; and ".join(no_room))
        return groups

    def _no_room(self, wids: list[str], bundles: list[dict[str, float]], strategy: str,
                 labels: list[dict[str, str]]) -> str:
        free = {k: round(v, 3) for k, v in sorted(self.ray.available_resources().items())
                if not k.startswith(("node:", "memory", "object_store"))}
        where = f", labels {labels}" if any(labels) else ""
        after = f"after {self.config.placement_timeout_s:.0f} s; free now: {free}"
        if strategy == TP_STRATEGY and len(wids) == 1 and len(bundles) > 1:
            total = {k: v * len(bundles) for k, v in bundles[0].items()}
            return (f"the cluster has no room for tensor-parallel worker {wids[0]}: "
                    f"{len(bundles)} bundles {bundles[0]} (one per rank, {TP_STRATEGY}: "
                    f"{total} on ONE node{where}) {after}. Add a node that big, or lower "
                    f"--prefill-tp/--decode-tp/--tensor-parallel-size or --cpus-per-worker/"
                    f"--gpus-per-worker")
        return (f"the cluster has no room for {len(bundles)} worker(s) with bundles {bundles} "
                f"(strategy {strategy}{where}) {after}. Add nodes, start them with the role "
                f"resources/labels, or lower --prefill/--decode/--cpus-per-worker")

    def _start_workers(self, events_address: str) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from deploy.ray_ranks import RayRankLauncher
        from deploy.ray_worker import WorkerActor

        roles = self.serve.worker_ids()
        num_gpus = self._num_gpus()
        device = "cuda" if num_gpus else "cpu"
        engines = {role: dataclasses.replace(e, device=device, rank_devices="own")
                   for role, e in self.engines.items()}
        groups = self._placement_groups(roles, num_gpus)
        runtime_env = self._runtime_env()
        num_threads = int(self.config.cpus_per_worker) if not num_gpus else 0
        for role, wid in roles:
            bundle = self.config.worker_bundle(role, num_gpus)
            custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
            pg, index = groups[wid]
            ranks = (RayRankLauncher(wid, bundle, num_threads, self.log_level, runtime_env)
                     if engines[role].tensor_parallel_size > 1 else None)
            self.workers[wid] = self.ray.remote(WorkerActor).options(
                name=wid, lifetime=self._lifetime(), max_restarts=self.config.max_restarts,
                max_concurrency=4, num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                resources=custom, runtime_env=runtime_env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=index),
            ).remote(role, self.worker_config(wid, events_address),
                     engines[role], num_threads, self.log_level, ranks)
        log.info("loading weights in %d worker actor(s)...", len(self.workers))

    def worker_config(self, worker_id: str, events_address: str) -> WorkerConfig:
        """A worker actor's config: what `pdserve serve` gives a worker process
        (deploy/local_launcher.py `worker_command`) that applies under Ray."""
        return WorkerConfig(worker_id=worker_id, events_address=events_address,
                            kv=self.serve.kv, cluster_secret=self.secret,
                            insecure_internal=self.secret is None,
                            warmup_s=self.serve.warmup_s)

    def _wait_for_workers(self) -> dict[str, dict]:
        """Every worker built and registered with the proxy; their placements by worker id."""
        ray, timeout = self.ray, self.serve.startup_timeout_s
        ready = {w.ready.remote(timeout): wid for wid, w in self.workers.items()}
        registered = self.proxy.wait_for_workers.remote(self.serve.num_prefill,
                                                        self.serve.decode, timeout)
        placement: dict[str, dict] = {}
        pending = [registered, *ready]
        while registered in pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                raise TimeoutError(f"workers did not start in {timeout:.0f} s")
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                raise RuntimeError(f"worker {ready.get(done[0], PROXY_ACTOR)} died during "
                                   f"start-up: {e}") from None
            except ray.exceptions.RayTaskError as e:
                raise RuntimeError(str(e.cause)) from None
            if done[0] in ready:
                placement[ready[done[0]]] = result
        return placement

    def _print_ready(self, url: str, placement: dict[str, dict]) -> None:
        proxy = self.ray.get(self.proxy.info.remote(), timeout=30)
        for wid, where in sorted(placement.items()):
            ranks = where.get("rank_pids", [])[1:]
            print(f"pdserve: {wid} on node {where['node_id'][:12]} "
                  f"({where['node_ip']}, pid {where['pid']}"
                  f"{f', rank actors pids {ranks}' if ranks else ''})", flush=True)
        print(f"pdserve: serving {self.engine.model} on {url} ({self.serve.num_prefill} prefill + "
              f"{self.serve.decode} decode, {self.serve.kv.transport}, Ray deployment "
              f"{self.config.deployment_name!r}, proxy on node {proxy['node_id'][:12]})",
              flush=True)
        if self.config.detach:
            flags = (f"--deployment-name {self.config.deployment_name}"
                     + (f" --address {self.config.address}" if self.config.address else ""))
            print(f"pdserve: detached; `pdserve status {flags}` shows it, `pdserve stop {flags}` "
                  f"removes it", flush=True)

    def _watch(self) -> int:
        """Block until Ctrl-C / SIGTERM (0) or until the proxy is gone for good (`pdserve stop`,
        or dead with no restart left); a proxy that Ray is restarting is waited for."""
        ray = self.ray
        restarting_since: float | None = None
        while True:
            time.sleep(1.0)
            try:
                ray.get(self.proxy.ping.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                try:  # a named actor that Ray still restarts keeps its name; a dead one does not
                    ray.get_actor(PROXY_ACTOR)
                except ValueError:
                    log.warning("the proxy actor is gone (pdserve stop, or no restart left): "
                                "shutting down")
                    return 0
                if restarting_since is None:
                    restarting_since = time.monotonic()
                    log.warning("the proxy actor died; Ray is restarting it (--max-restarts)")
                continue
            except (ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError) as e:
                recovering = (restarting_since is not None
                              and isinstance(e, ray.exceptions.GetTimeoutError)
                              and time.monotonic() - restarting_since
                              < self.serve.startup_timeout_s)
                if recovering:  # a restarted proxy answers once it has recovered
                    continue
                log.error("the proxy stopped answering (%s): shutting down", e)
                return 1
            if restarting_since is not None:
                log.warning("the proxy is back after %.0f s", time.monotonic() - restarting_since)
                restarting_since = None
