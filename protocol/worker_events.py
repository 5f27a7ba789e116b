"""Channel workers -> proxy (events): registration, heartbeats, reservations, tokens, failures."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kv_spec import KvSpec
from engine.outputs import FinishReason, TokenLogprob
from engine.step_stats import StepStats
from protocol.codec import MessageFamily
from protocol.errors import ErrorCode
from protocol.rejections import RejectedCount


@dataclass(frozen=True)
class Hello:
    worker_id: str
    role: str  # "prefill" | "decode"
    ctrl_address: str
    kv_address: str
    kv_spec: KvSpec
    plan: str
    pid: int
    host: str
    model: str = ""
    max_num_batched_tokens: int = 0  # its scheduler's token budget per step (0: unknown)
    rank_pids: list[int] = field(default_factory=list)  # tensor-parallel ranks: pid of each


@dataclass(frozen=True)
class Heartbeat:
    worker_id: str
    role: str
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int = 0
    steps: list[StepStats] = field(default_factory=list)  # since the last heartbeat (cost models)
    rejected: list[RejectedCount] = field(default_factory=list)  # running totals, by plane/reason


@dataclass(frozen=True)
class Reserved:
    request_id: str
    worker_id: str
    block_ids: list[int]


@dataclass(frozen=True)
class Rejected:
    request_id: str
    worker_id: str
    reason: str
    status: int = 503
    retry_after_s: float = 1.0


@dataclass(frozen=True)
class Tokens:
    """New output tokens of one request; `logprobs[i]` is token i's when they were asked for."""

    request_id: str
    worker_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class PrefillDone:
    request_id: str
    worker_id: str
    num_cached_tokens: int
    kv_bytes: int
    kv_seconds: float


@dataclass(frozen=True)
class RequestFailed:
    """A request failed on a worker: why (`code`) and the worker's words for it (`error`)."""

    request_id: str
    worker_id: str
    error: str
    code: ErrorCode = ErrorCode.INTERNAL

    @property
    def retryable(self) -> bool:
        """Another worker may redo the failed step (follows from the code alone)."""
        return self.code.retryable


WORKER_EVENTS = MessageFamily(
    "workers->proxy", (Hello, Heartbeat, Reserved, Rejected, Tokens, PrefillDone, RequestFailed))
