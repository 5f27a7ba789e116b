"""Local launch: the proxy in this process, each worker in its own process, all on one machine.

Start-up order: check the KV plan (fails fast, before any weight is read), bind the proxy's
event socket, start the workers (each prints its plan and address as it comes up), wait for
all of them to say Hello, then bind HTTP and print the URL. While serving, a worker that exits
is reaped and started again (`--max-restarts`, deploy/worker_supervisor.py). Ctrl-C or SIGTERM
stops the HTTP server, tells every worker to shut down, and terminates any that do not exit in
time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from types import FrameType

import torch
import uvicorn

from deploy.worker_net import WorkerNetConfig
from deploy.worker_supervisor import WorkerSupervisor
from engine.checkpoint import read_model_config, resolve_model_path
from engine.config import ConfigError, EngineConfig
from engine.memory_plan import plan_kv_cache
from engine.tokenizer import Tokenizer
from protocol.auth import AuthError, generate_secret, load_secret, secret_env
from proxy.app import ProxyConfig, build_app, http_rejections
from proxy.cluster import ClusterClient
from proxy.cluster_state import ClusterConfig
from proxy.http_server import uvicorn_config
from proxy.limits import HttpLimits
from proxy.metrics import ProxyMetrics
from worker.args import dataclass_to_args, parse_seconds
from worker.config import KvTransportConfig, parse_cpus

PLACEMENTS = ("adaptive", "remote", "local")

log = logging.getLogger("pdserve.launcher")


@dataclass(frozen=True)
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={
        "help": "HTTP bind address (the API only; internal sockets bind --internal-host)."})
    internal_host: str = field(default="127.0.0.1", metadata={
        "help": "Address the internal sockets bind (workers' control and KV ports, the proxy's "
                "event port), whatever --host is. With --ray: each node's IP."})
    cluster_secret_file: str = field(default="", metadata={
        "help": "File holding the deployment's secret (hex, mode 600) that authenticates every "
                "internal plane; default PDSERVE_CLUSTER_SECRET, else a fresh one per launch."})
    insecure_internal: bool = field(default=False, metadata={
        "help": "Run the internal planes unauthenticated (benchmarks only: anyone who reaches "
                "an internal port can read prompts and control the workers)."})
    port: int = field(default=8000, metadata={"help": "HTTP port (0 = any free port)."})
    prefill: int = field(default=1, metadata={"help": "Number of prefill workers."})
    decode: int = field(default=1, metadata={"help": "Number of decode workers."})
    colocated: bool = field(default=False, metadata={
        "help": "No prefill workers: decode workers prefill locally (baseline)."})
    api_key: str | None = field(default=None, metadata={
        "help": "Require 'Authorization: Bearer KEY' on /v1/*."})
    max_n: int = field(default=16, metadata={
        "help": "Most choices (`n`) a request may ask for per prompt."})
    allowed_origins: str = field(default="", metadata={
        "help": "CORS: comma-separated origins browsers may call the API from, e.g. "
                "'https://app.example.com' or '*' (default: none, no CORS headers)."})
    served_model_name: str | None = field(default=None, metadata={
        "help": "Model name in the API (default: the --model value)."})
    prefill_profile: str | None = field(default=None, metadata={
        "help": "GPU profile of the prefill workers' KV cache (e.g. ampere)."})
    decode_profile: str | None = field(default=None, metadata={
        "help": "GPU profile of the decode workers' KV cache (e.g. volta)."})
    prefill_tp: int | None = field(default=None, metadata={
        "help": "Tensor-parallel ranks of each prefill worker (default: "
                "--tensor-parallel-size)."})
    decode_tp: int | None = field(default=None, metadata={
        "help": "Tensor-parallel ranks of each decode worker (default: "
                "--tensor-parallel-size)."})
    router: str = field(default="least-loaded", metadata={
        "help": "Decode routing: least-loaded or round-robin."})
    startup_timeout_s: float = field(default=300.0, metadata={
        "help": "How long to wait for workers to load."})
    heartbeat_timeout_s: float = field(default=3.0, metadata={
        "help": "A worker silent this long is dead."})
    placement: str = field(default="adaptive", metadata={
        "help": "Where prompts are prefilled: adaptive (per request, by predicted TTFT and "
                "TPOT against the SLOs), remote (prefill workers) or local (decode workers)."})
    slo_ttft: float = field(default=1.0, metadata={
        "parse": parse_seconds, "help": "Time-to-first-token SLO that adaptive placement "
                                        "plans for, e.g. 1s or 800ms."})
    slo_tpot: float = field(default=0.05, metadata={
        "parse": parse_seconds, "help": "Time-per-output-token SLO that adaptive placement "
                                        "plans for, e.g. 50ms."})
    cpu_affinity: str = field(default="", metadata={
        "help": "Pin worker i to core i mod N of this list, e.g. '0,1' (empty: no pinning). "
                "Each pinned worker runs one torch thread unless --worker-threads says."})
    worker_threads: int = field(default=0, metadata={
        "help": "torch CPU threads per worker (0: the cores divided among the workers, or 1 "
                "when pinned)."})
    warmup_s: float = field(default=3.0, metadata={
        "help": "Seconds of synthetic requests each worker runs at start-up to seed the "
                "placement cost models (0: none)."})
    kv: KvTransportConfig = field(default_factory=KvTransportConfig)  # flags: worker/config.py
    http: HttpLimits = field(default_factory=HttpLimits)  # flags: proxy/limits.py
    net: WorkerNetConfig = field(default_factory=WorkerNetConfig)  # flags: deploy/worker_net.py

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"--placement must be one of {', '.join(PLACEMENTS)}, "
                              f"got {self.placement!r}")
        for flag, value in (("--slo-ttft", self.slo_ttft), ("--slo-tpot", self.slo_tpot)):
            if not (isinstance(value, int | float) and 0 < value < 3600):
                raise ConfigError(f"{flag} must be a duration above 0, got {value!r}")
        if self.cpu_affinity:
            parse_cpus(self.cpu_affinity)
        if self.worker_threads < 0 or self.warmup_s < 0:
            raise ConfigError("--worker-threads and --warmup-s must be 0 or more")
        if self.decode < 1:
            raise ConfigError("--decode must be at least 1")
        for flag, tp in (("--prefill-tp", self.prefill_tp), ("--decode-tp", self.decode_tp)):
            if tp is not None and tp < 1:
                raise ConfigError(f"{flag} must be at least 1, got {tp}")
        if not 1 <= self.max_n <= 256:
            raise ConfigError(f"--max-n must be in [1, 256], got {self.max_n}")
        if self.prefill < 0:
            raise ConfigError("--prefill must be 0 or more")
        if self.kv.transport == "nccl" and not torch.cuda.is_available():
            raise ConfigError("--transport nccl moves KV between GPUs, and this machine has no "
                              "usable CUDA device; use --transport zmq")

    @property
    def num_prefill(self) -> int:
        return 0 if self.colocated else self.prefill

    def tp_of(self, role: str, engine_tp: int) -> int:
        """Tensor-parallel ranks of a worker of `role` (its override, else the engine's)."""
        override = self.prefill_tp if role == "prefill" else self.decode_tp
        return override or engine_tp

    def check_tp(self, engine_tp: int) -> None:
        """Tensor-parallel workers exchange KV rank to rank (transfer/convert/tp_routes.py) over
        the ZMQ transport (whole prompts or layer-wise streams): refuse what is not routed per rank
        yet."""
        for role, flag, is_used in (("prefill", "--prefill-tp", self.num_prefill > 0),
                                    ("decode", "--decode-tp", not self.colocated)):
            tp = self.tp_of(role, engine_tp)
            if tp == 1 or not is_used:
                continue
            if self.kv.transport != "zmq":
                raise ConfigError(
                    f"{flag} / --tensor-parallel-size {tp} with --transport "
                    f"{self.kv.transport}: tensor-parallel {role} workers exchange KV per rank "
                    f"over --transport zmq only (NCCL pairs are not routed per rank yet)")

    def worker_ids(self) -> list[tuple[str, str]]:
        """(role, worker id) of every worker: `prefill-<i>` then `decode-<i>` (also Ray actor
        names)."""
        return ([("prefill", f"prefill-{i}") for i in range(self.num_prefill)]
                + [("decode", f"decode-{i}") for i in range(self.decode)])


def proxy_config(serve: ServeConfig, name: str, max_model_len: int) -> ProxyConfig:
    """The HTTP front end's settings from `pdserve serve`'s."""
    origins = tuple(o.strip() for o in serve.allowed_origins.split(",") if o.strip())
    return ProxyConfig(name, max_model_len, serve.api_key, allowed_origins=origins,
                       max_n=serve.max_n, limits=serve.http)


def load_tokenizer(model: str) -> Tokenizer:
    path = resolve_model_path(model)
    return Tokenizer.from_gguf(path) if path.is_file() else Tokenizer.from_hf_dir(path)


INSECURE_WARNING = ("WARNING: --insecure-internal: the internal planes (control, events, KV) are "
                    "NOT authenticated; anyone who reaches their ports can read prompts, inject "
                    "tokens and stop workers. Use it for benchmarks only.")


def cluster_secret(serve: ServeConfig) -> bytes | None:
    """The deployment's secret: --cluster-secret-file, else PDSERVE_CLUSTER_SECRET, else a fresh
    one (a single launch that starts every component); None with --insecure-internal (after
    a loud warning). Raises ConfigError for an unreadable or weak secret."""
    if serve.insecure_internal:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
        log.warning(INSECURE_WARNING)
        return None
    try:
        return load_secret(serve.cluster_secret_file) or generate_secret()
    except AuthError as e:
        raise ConfigError(str(e)) from None


def worker_command(role: str, worker_id: str, events_address: str, serve: ServeConfig,
                   engine_args: list[str], device: str, num_threads: int,
                   cpus: str = "") -> list[str]:
    """The worker's command line: no secret on it (it travels in the environment); the
    worker logs at this process's level (`pdserve --log-level`)."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    profile = serve.prefill_profile if role == "prefill" else serve.decode_profile
    tp = serve.prefill_tp if role == "prefill" else serve.decode_tp
    cmd = [*serve.net.prefix(role), sys.executable, "-m", role, "--worker-id", worker_id,
           "--events-address", events_address,
           "--host", serve.net.host(role, serve.internal_host), "--exit-with-parent",
           *(["--insecure-internal"] if serve.insecure_internal else []), "--device", device,
           "--num-threads", str(num_threads), "--warmup-s", str(serve.warmup_s),
           "--log-level", level, *(["--cpu-affinity", cpus] if cpus else []),
           *dataclass_to_args(serve.kv), *engine_args,
           *(["--tensor-parallel-size", str(tp)] if tp else [])]
    return [*cmd, "--profile", profile] if profile else cmd


def worker_cpus(serve: ServeConfig, num_workers: int) -> tuple[list[str], int]:
    """Each worker's core (empty: unpinned) and its torch threads, from --cpu-affinity and
    --worker-threads."""
    if not serve.cpu_affinity:
        threads = serve.worker_threads or max(1, (os.cpu_count() or 1) // num_workers)
        return [""] * num_workers, threads
    cores = sorted(parse_cpus(serve.cpu_affinity))
    return [str(cores[i % len(cores)]) for i in range(num_workers)], serve.worker_threads or 1


def interrupt_on_sigterm() -> None:
    """SIGTERM (`kill`, systemd, docker stop) takes the Ctrl-C path: KeyboardInterrupt in the
    main thread, so a launcher's cleanup runs. (uvicorn shuts down on SIGTERM and then raises
    it again: with the default action the launcher died before it stopped its workers.)"""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cluster_config(serve: ServeConfig, **overrides: object) -> ClusterConfig:
    """The proxy's settings from `pdserve serve`'s (local and Ray launchers alike)."""
    settings: dict[str, object] = {
        "host": serve.internal_host, "colocated": serve.colocated, "router": serve.router,
        "heartbeat_timeout_s": serve.heartbeat_timeout_s, "placement": serve.placement,
        "slo_ttft_s": serve.slo_ttft, "slo_tpot_s": serve.slo_tpot}
    return ClusterConfig(**{**settings, **overrides})  # type: ignore[arg-type]


def worker_devices(widths: list[int], count: int) -> list[str]:
    """Each worker's first device, for workers of `widths` TP ranks on `count` GPUs: GPUs in
    turn, a worker's ranks never wrapping past the last GPU (rank r runs on first + r)."""
    if not count:
        return ["cpu"] * len(widths)
    out, start = [], 0
    for width in widths:
        if start % count + width > count:
            start += count - start % count
        out.append(f"cuda:{start % count}")
        start += width
    return out


class LocalDeployment:
    def __init__(self, serve: ServeConfig, engine: EngineConfig, engine_args: list[str],
                 max_restarts: int = 3) -> None:
        self.serve, self.engine, self.engine_args = serve, engine, engine_args
        self.max_restarts = max_restarts
        self.procs: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, list[str]] = {}
        self.secret = cluster_secret(serve)

    def start_workers(self, events_address: str) -> None:
        roles = self.serve.worker_ids()
        cpus, threads = worker_cpus(self.serve, len(roles))
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        widths = [self.serve.tp_of(role, self.engine.tensor_parallel_size) for role, _ in roles]
        devices = worker_devices(widths, count)
        for (role, wid), device, cores in zip(roles, devices, cpus, strict=True):
            self.commands[wid] = worker_command(role, wid, events_address, self.serve,
                                                self.engine_args, device, threads, cores)
            self.procs[wid] = self.start_worker(wid)
            log.info("started %s worker %s (pid %d) on %s", role, wid, self.procs[wid].pid, device)

    def start_worker(self, worker_id: str) -> subprocess.Popen:
        # Idle OpenMP threads must sleep, not spin: on a small machine spinning workers starve
        # the proxy and each other (measured: colocated TTFT 2.5 s -> 0.5 s on 2 cores).
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ,
               **(secret_env(self.secret) if self.secret is not None else {})}
        return subprocess.Popen(self.commands[worker_id], env=env)

    def stop_workers(self, timeout_s: float = 10.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for wid, p in self.procs.items():
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in %.0f s: killing it", wid, timeout_s)
                p.kill()
                p.wait()

    async def serve_forever(self) -> None:
        model = read_model_config(self.engine.model)
        plan = plan_kv_cache(model, self.engine)  # fails fast, before any worker loads weights
        metrics = ProxyMetrics()
        cluster = ClusterClient(cluster_config(self.serve, secret=self.secret), metrics)
        cluster.start()
        try:
            self.start_workers(cluster.events_address)
            log.info("loading weights in %d worker(s)...", len(self.procs))
            await self._wait_for_workers(cluster)
            tokenizer = load_tokenizer(self.engine.model)
            name = self.serve.served_model_name or self.engine.model
            app = build_app(proxy_config(self.serve, name, plan.max_model_len), cluster,
                            tokenizer, metrics)
            supervisor = WorkerSupervisor(self.procs, self.start_worker, self.max_restarts)
            supervise = asyncio.create_task(supervisor.run())
            try:
                await self._run_http(app, metrics)
            finally:
                supervise.cancel()
        finally:
            await cluster.close()
            self.stop_workers()

    async def _wait_for_workers(self, cluster: ClusterClient) -> None:
        wait = asyncio.create_task(cluster.wait_for_workers(self.serve.num_prefill,
                                                            self.serve.decode,
                                                            self.serve.startup_timeout_s))
        while not wait.done():
            dead = {w: p.returncode for w, p in self.procs.items() if p.poll() is not None}
            if dead:
                wait.cancel()
                raise RuntimeError(f"worker(s) exited during start-up: {dead} "
                                   f"(see their log lines above)")
            await asyncio.sleep(0.2)
        wait.result()

    async def _run_http(self, app: object, metrics: ProxyMetrics) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.serve.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.serve.host, self.serve.port))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn_config(app, self.serve.http, http_rejections(metrics)))
        print(f"pdserve: serving {self.engine.model} on http://{self.serve.host}:{port} "
              f"({self.serve.num_prefill} prefill + {self.serve.decode} decode, "
              f"{self.serve.kv.transport})",
              flush=True)
        await server.serve(sockets=[sock])
