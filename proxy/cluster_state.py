"""What the proxy's ClusterClient keeps: its settings, each worker it knows and each request in
flight (where it is, since when, on which workers)."""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from dataclasses import dataclass, field

import zmq.asyncio

from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams
from protocol import worker_events as ev
from proxy.router import WorkerState


@dataclass(frozen=True)
class ClusterConfig:
    host: str = "127.0.0.1"
    heartbeat_timeout_s: float = 3.0
    queue_timeout_s: float = 30.0
    prefill_timeout_s: float = 120.0
    stream_timeout_s: float = 60.0
    colocated: bool = False
    router: str = "least-loaded"  # decode routing: least-loaded | round-robin
    events_port: int = 0  # 0: any free port (a restarted Ray proxy binds its predecessor's)
    placement: str = "remote"  # where prompts are prefilled: adaptive | remote | local
    slo_ttft_s: float = 1.0  # the SLOs adaptive placement plans for
    slo_tpot_s: float = 0.05
    # the deployment's secret (protocol/auth.py): CURVE on the event socket and every control
    # socket; None: unauthenticated (--insecure-internal)
    secret: bytes | None = field(default=None, repr=False)


class Stage(enum.Enum):
    RESERVING = "reserving"
    PREFILLING = "prefilling"
    DECODING = "decoding"


@dataclass
class Worker:
    hello: ev.Hello
    socket: zmq.asyncio.Socket
    state: WorkerState
    last_seen: float
    requests: set[str] = field(default_factory=set)
    num_preemptions_seen: int = 0
    rejected_seen: dict[tuple[str, str], int] = field(default_factory=dict)  # (plane, reason)

    @property
    def is_alive(self) -> bool:
        return self.state.is_alive


@dataclass
class RequestState:
    """One request in flight: where it is (`stage`, since when), on which workers, and the
    queue its Tokens events (or the ApiError that ends it) go to."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    decode_id: str
    prefill_id: str | None = None
    block_ids: list[int] = field(default_factory=list)
    stage: Stage = Stage.RESERVING
    stage_since: float = field(default_factory=time.monotonic)
    tried_prefill: set[str] = field(default_factory=set)
    num_prefill_cached_tokens: int = 0
    preferred_prefill: str | None = None  # adaptive placement's choice of prefill worker
    prompt_logprobs: list[TokenLogprob] | None = None  # all of them, once the last part came
    prompt_logprobs_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _prompt_logprobs_parts: list[TokenLogprob] = field(default_factory=list)
    # the reservation's token: the decode worker gets it with Reserve, the prefill worker with
    # Prefill, and the KV header must carry it
    kv_token: str = field(default_factory=lambda: secrets.token_hex(16))

    def add_prompt_logprobs(self, part: ev.PromptLogprobs) -> None:
        """Assemble the parts in order; a part that does not continue them is dropped, and a
        first part starts over (a retried prefill sends them again)."""
        if self.prompt_logprobs is not None:
            return  # complete already
        if part.start == 0:
            self._prompt_logprobs_parts = []
        if part.start != len(self._prompt_logprobs_parts):
            return
        self._prompt_logprobs_parts += part.logprobs
        if part.is_last:
            self.prompt_logprobs, self._prompt_logprobs_parts = self._prompt_logprobs_parts, []
            self.prompt_logprobs_arrived.set()

    def enter(self, stage: Stage) -> None:
        self.stage, self.stage_since = stage, time.monotonic()
