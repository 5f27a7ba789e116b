"""The proxy as a Ray actor, pinned to one node (the head unless `--proxy-node` says otherwise).

It runs exactly what the local launcher runs in its own process — ClusterClient (proxy/cluster.py)
and the OpenAI app (proxy/app.py) under uvicorn — on an event loop of its own thread, so Ray's
calls (`start_cluster`, `wait_for_workers`, `start_http`, `status`, `shutdown`) never block it.
Its event socket is bound on this node's IP: workers on every node send Hello and heartbeats
there. The launcher drives the steps in order; `status()` is the topology behind `/status`.

Restarts (`--max-restarts`, as for workers): once serving, the proxy records its event and HTTP
ports in Ray's internal key-value store under the deployment's namespace (JSON). A restarted
proxy process binds the same two ports, registers the worker actors that are running from
their Hello (`WorkerActor.hello`), and serves again at the same URL; the workers' event sockets
reconnect by themselves. Requests in flight when it died are lost (their clients see the
connection drop): before serving, the new proxy tells every registered worker to drop all it
holds (AbortAll), so their blocks are freed at once. Workers restarting meanwhile register
themselves when they say Hello.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvicorn

from deploy.local_launcher import ServeConfig, cluster_config, load_tokenizer, proxy_config
from deploy.ray_env import setup_actor_logging, where_am_i
from proxy.app import build_app, http_rejections
from proxy.cluster import ClusterClient
from proxy.http_server import uvicorn_config
from proxy.metrics import ProxyMetrics

log = logging.getLogger("pdserve.ray.proxy")
T = TypeVar("T")
STATE_KEY = "pdserve-proxy-ports"  # in Ray's internal KV, namespace = the deployment's


def _save_ports(ports: dict[str, int]) -> None:
    import ray
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(STATE_KEY, json.dumps(ports).encode(), overwrite=True,
                     namespace=ray.get_runtime_context().namespace)


def _load_ports() -> dict[str, int] | None:
    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(STATE_KEY, namespace=ray.get_runtime_context().namespace)
    return None if raw is None else json.loads(raw)


def clear_state(namespace: str) -> None:
    """Forget the ports of a removed deployment (a driver connected to the cluster calls it)."""
    from ray.experimental.internal_kv import _internal_kv_del

    with contextlib.suppress(Exception):
        _internal_kv_del(STATE_KEY, namespace=namespace)


def _was_restarted() -> bool:
    import warnings

    import ray

    with warnings.catch_warnings():  # Ray's own property calls a deprecated one
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


class ProxyActor:
    def __init__(self, serve: ServeConfig, model: str, max_model_len: int,
                 log_level: str = "INFO", secret: bytes | None = None) -> None:
        """`secret`: the deployment's (an actor argument, never a command line; None with
        --insecure-internal)."""
        setup_actor_logging(log_level, "proxy")
        self.serve, self.model, self.max_model_len = serve, model, max_model_len
        self.secret = secret
        self.where = where_am_i()
        self.metrics = ProxyMetrics()
        self.cluster: ClusterClient | None = None
        self.server: uvicorn.Server | None = None
        self.url: str | None = None
        self._http: asyncio.Future | None = None
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="proxy-loop", daemon=True).start()
        if _was_restarted():
            self._recover()

    def _recover(self) -> None:
        """This process replaces a proxy that died: same ports, running workers, serve again."""
        ports = _load_ports()
        if ports is None:
            log.error("proxy restarted before it ever served: nothing to recover; "
                      "the launcher decides")
            return
        self.start_cluster(events_port=int(ports["events_port"]))
        registered = self._register_running_workers()
        cluster = self.cluster
        assert cluster is not None
        self._run(cluster.abort_all("the proxy restarted; its requests' clients are gone"))
        self.start_http(port=int(ports["http_port"]))
        log.warning("proxy restarted: %d running worker(s) registered again, serving on %s",
                    registered, self.url)

    def _register_running_workers(self) -> int:
        import ray

        cluster = self.cluster
        assert cluster is not None
        hellos = []
        for _, name in self.serve.worker_ids():
            try:
                hello = ray.get(ray.get_actor(name).hello.remote(), timeout=30)
            except Exception as e:  # gone or restarting: it says Hello itself once it runs
                log.warning("worker %s not registered from its actor (%s)", name, type(e).__name__)
                continue
            if hello is not None:
                hellos.append(hello)

        async def register() -> None:
            for hello in hellos:
                cluster.register(hello)

        self._run(register())
        return len(hellos)

    def __repr__(self) -> str:
        return "proxy"

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    # ---- start-up, in the launcher's order -----------------------------------------------------
    def start_cluster(self, events_port: int = 0) -> dict[str, Any]:
        """Bind the workers -> proxy event socket on this node's IP; its address and placement."""
        async def start() -> str:
            config = cluster_config(self.serve, host=self.where["node_ip"],
                                    events_port=events_port, secret=self.secret)
            self.cluster = ClusterClient(config, self.metrics)
            self.cluster.start()
            return self.cluster.events_address

        return {"events_address": self._run(start()), **self.where}

    def wait_for_workers(self, num_prefill: int, num_decode: int, timeout_s: float) -> None:
        assert self.cluster is not None, "start_cluster() first"
        self._run(self.cluster.wait_for_workers(num_prefill, num_decode, timeout_s))

    def start_http(self, port: int | None = None) -> str:
        """Bind `--host:--port` (or `port`) on this node, serve the OpenAI API; the URL clients
        use. Records both ports for a restart."""
        assert self.cluster is not None, "start_cluster() first"
        name = self.serve.served_model_name or self.model
        app = build_app(proxy_config(self.serve, name, self.max_model_len), self.cluster,
                        load_tokenizer(self.model), self.metrics)
        host = self.serve.host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, self.serve.port if port is None else port))
        port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, self.serve.http,
                                                    http_rejections(self.metrics)))
        self._http = asyncio.run_coroutine_threadsafe(self.server.serve(sockets=[sock]), self.loop)
        deadline = time.monotonic() + 30.0
        while not self.server.started:
            if self._http.done():
                self._http.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("the HTTP server did not start in 30 s")
            time.sleep(0.05)
        shown = self.where["node_ip"] if host in ("0.0.0.0", "::", "") else host
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
        log.info("serving the OpenAI API on %s", self.url)
        _save_ports({"events_port": int(self.cluster.events_address.rsplit(":", 1)[1]),
                     "http_port": port})
        return self.url

    # ---- views ---------------------------------------------------------------------------------
    def ping(self) -> bool:
        """True while the HTTP server runs; raises what stopped it otherwise."""
        if self._http is not None and self._http.done():
            self._http.result()
            raise RuntimeError("the proxy's HTTP server stopped")
        return True

    def info(self) -> dict[str, Any]:
        return {**self.where, "url": self.url, "model": self.serve.served_model_name or self.model,
                "max_model_len": self.max_model_len}

    def status(self) -> dict[str, Any]:
        """The same body as GET /status: model, max_model_len and the workers' topology."""
        async def topology() -> list[dict]:
            return self.cluster.topology() if self.cluster is not None else []

        return {"model": self.serve.served_model_name or self.model,
                "max_model_len": self.max_model_len,
                "workers": self._run(topology(), 10.0)}

    # ---- shutdown ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop HTTP, tell every worker to shut down, close the sockets. Idempotent."""
        if self.server is not None:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                self._http.result(10.0)  # type: ignore[union-attr]
            self.server = None
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            with contextlib.suppress(Exception):
                self._run(cluster.close(), 10.0)
