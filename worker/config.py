"""Worker configuration: the process's own settings and the KV transport settings it shares with
`pdserve serve`.

`KvTransportConfig` is defined once: `ServeConfig` embeds it (its flags are `pdserve serve`'s),
both launchers hand it to every worker whole (the local one as flags, `dataclass_to_args`; the
Ray one as the object), and each worker reads the half that concerns its role.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import ConfigError
from transfer.wire.header import ReceiverLimits

TRANSPORTS = ("zmq", "nccl")
KV_PAYLOADS = ("stream", "frames")
KV_STREAMING = ("whole", "layerwise")
KV_WIRE_DTYPES = ("auto", "fp8_e4m3", "int8")  # transfer/convert/wire_dtype.py: WIRE_DTYPES


@dataclass(frozen=True)
class KvTransportConfig:
    transport: str = field(default="zmq", metadata={
        "help": "KV transport between prefill and decode: zmq, or nccl (header over ZMQ, bytes "
                "GPU to GPU)."})
    kv_payload: str = field(default="stream", metadata={
        "help": "With --transport zmq: KV bytes on a stream socket per pair (writev/readv, "
                "default) or as ZMQ frames."})
    kv_receiver_thread: bool = field(default=True, metadata={
        "help": "Decode workers receive KV on a thread of their own while the model steps "
                "(off: only between steps)."})
    transfer_timeout_s: float = field(default=30.0, metadata={
        "help": "Prefill workers: one KV transfer, ack included; a decode worker slower than "
                "this fails it."})
    checksum: bool = field(default=False, metadata={
        "help": "Prefill workers: an xxh3 checksum on every KV buffer, checked on arrival."})
    max_transfer_bytes: int = field(default=8 << 30, metadata={
        "help": "Decode workers: the largest KV message accepted (bytes)."})
    max_kv_peers: int = field(default=64, metadata={
        "help": "KV peers per worker: prefill send lanes (one per decode worker) and decode NCCL "
                "links (one per prefill worker); more are refused and counted."})
    kv_wire_dtype: str = field(default="auto", metadata={
        "help": "Prefill workers: KV dtype on the wire: auto (the cache's own), int8 or "
                "fp8_e4m3 (quantized with per-token-head scales, dequantized by the decode "
                "worker; lossy, see the README)."})
    kv_streaming: str = field(default="whole", metadata={
        "help": "Prefill workers: send a prompt's KV whole once it is prefilled, or layerwise: "
                "each layer group of each chunk as soon as the forward pass has written it, "
                "while the following layers compute."})
    kv_stream_groups: int = field(default=6, metadata={
        "help": "With --kv-streaming layerwise: layer groups per chunk (one transfer each), "
                "smaller at both ends (30 layers in 6: 2, 4, 9, 9, 4, 2)."})
    kv_sender_cpus: str = field(default="", metadata={
        "help": "Prefill workers: cores their KV send threads run on, e.g. '1' or '2-3' "
                "(empty: the worker's own). On CPU, a layer-wise send on the core of the "
                "forward pass it overlaps slows that pass."})

    def __post_init__(self) -> None:
        if self.kv_streaming not in KV_STREAMING:
            raise ConfigError(f"--kv-streaming must be whole or layerwise, "
                              f"got {self.kv_streaming!r}")
        if self.kv_stream_groups < 1:
            raise ConfigError(f"--kv-stream-groups must be 1 or more, got {self.kv_stream_groups}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"--transport must be zmq or nccl, got {self.transport!r}")
        if self.kv_payload not in KV_PAYLOADS:
            raise ConfigError(f"--kv-payload must be stream or frames, got {self.kv_payload!r}")
        if self.kv_wire_dtype not in KV_WIRE_DTYPES:
            raise ConfigError(f"--kv-wire-dtype must be one of {', '.join(KV_WIRE_DTYPES)}, "
                              f"got {self.kv_wire_dtype!r}")
        if self.transfer_timeout_s <= 0:
            raise ConfigError(
                f"--transfer-timeout-s must be positive, got {self.transfer_timeout_s}")
        if self.max_kv_peers < 1:
            raise ConfigError(f"--max-kv-peers must be at least 1, got {self.max_kv_peers}")
        if self.max_transfer_bytes <= 0:
            raise ConfigError(
                f"--max-transfer-bytes must be positive, got {self.max_transfer_bytes}")
        if self.kv_sender_cpus:
            parse_cpus(self.kv_sender_cpus, "--kv-sender-cpus")

    def limits(self) -> ReceiverLimits:
        return ReceiverLimits(max_message_bytes=self.max_transfer_bytes)


def parse_cpus(text: str, flag: str = "--cpu-affinity") -> set[int]:
    """'0', '2,3' or '0-3' -> a set of core numbers; ConfigError naming `flag`."""
    cpus: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"{flag}: expected cores like 0, 2,3 or 0-3, got {text!r}") from None
    if not cpus or min(cpus) < 0:
        raise ConfigError(f"{flag}: expected cores like 0, 2,3 or 0-3, got {text!r}")
    return cpus


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str = field(metadata={"help": "This worker's name (unique in the deployment)."})
    events_address: str = field(metadata={"help": "The proxy's event socket (tcp://host:port)."})
    host: str = field(default="127.0.0.1", metadata={
        "help": "Address this worker binds (ports are chosen free)."})
    heartbeat_interval_s: float = field(default=0.5, metadata={
        "help": "Seconds between heartbeats."})
    hello_interval_s: float = field(default=5.0, metadata={
        "help": "Seconds between repeated Hellos (a proxy that lost this worker registers it "
                "again)."})
    max_queue: int = field(default=512, metadata={
        "help": "Requests waiting for blocks before 503."})
    kv_timeout_s: float = field(default=60.0, metadata={
        "help": "Decode: how long a reservation waits for its KV."})
    idle_poll_ms: int = field(default=10, metadata={"help": "Poll wait when idle."})
    warmup_s: float = field(default=3.0, metadata={
        "help": "Seconds of synthetic requests at start-up that seed the proxy's step-time "
                "models (0: none)."})
    cpu_affinity: str = field(default="", metadata={
        "help": "Cores this worker runs on, e.g. '0' or '2,3' (empty: any)."})
    exit_with_parent: bool = field(default=False, metadata={
        "help": "Stop when the process that started this worker exits (the local launcher "
                "passes it: a killed `pdserve serve` leaves no worker behind)."})
    cluster_secret_file: str = field(default="", metadata={
        "help": "File holding the deployment's secret (hex; mode 600). Default: the "
                "PDSERVE_CLUSTER_SECRET environment variable the launcher sets."})
    insecure_internal: bool = field(default=False, metadata={
        "help": "No authentication on the internal planes (benchmarks only: anyone who reaches "
                "a worker's ports controls it)."})
    kv: KvTransportConfig = field(default_factory=KvTransportConfig)
    # read from cluster_secret_file or the environment by the entry point; never a flag
    cluster_secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.cluster_secret is None and not self.insecure_internal:
            raise ConfigError("no cluster secret: the launcher passes one in "
                              "PDSERVE_CLUSTER_SECRET; give --cluster-secret-file, or "
                              "--insecure-internal to run the internal planes unauthenticated")
        if self.warmup_s < 0:
            raise ConfigError(f"--warmup-s must be 0 or more, got {self.warmup_s}")
        if self.cpu_affinity:
            parse_cpus(self.cpu_affinity)
