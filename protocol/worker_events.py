"""Channel workers -> proxy (events): registration, heartbeats, reservations, tokens, failures.

Every field is bounded (protocol/bounds.py); a `Hello` checks its role and addresses as it is
built, so a malformed one never reaches the proxy's registry. Free text a worker writes (an
error, a reason) is cut to `MAX_TEXT_LEN` when built, so a long exception message cannot make
the event unreadable to the proxy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kv_spec import KvSpec
from engine.outputs import FinishReason, TokenLogprob
from engine.step_stats import StepStats
from protocol.bounds import MAX_ADDRESS_LEN, MAX_ID_LEN, MAX_TEXT_LEN, bounded
from protocol.codec import MessageFamily
from protocol.errors import ErrorCode
from protocol.rejections import RejectedCount

ROLES = ("prefill", "decode")
MAX_COUNT = 1 << 40  # any count a worker reports (tokens, blocks, requests)
MAX_LIST = 1 << 20  # token ids and block ids in one event
MAX_TP_RANKS = 1024


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT_LEN else text[:MAX_TEXT_LEN - 3] + "..."


def _check_address(name: str, address: str) -> None:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    if not address.startswith("tcp://") or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ValueError(f"{name} must be tcp://host:port, got {address!r:.80}")


def check_rank_addresses(addresses: list[str], kv_address: str, spec: KvSpec) -> None:
    """A decode worker's per-rank KV receivers: none, or one per TP rank of `spec`, rank 0's
    being `kv_address`."""
    if not addresses:
        return
    if len(addresses) != spec.tp_size or addresses[0] != kv_address:
        raise ValueError(f"kv_rank_addresses must list kv_spec.tp_size ({spec.tp_size}) "
                         f"addresses, kv_address first; got {len(addresses)}")
    for i, address in enumerate(addresses):
        _check_address(f"kv_rank_addresses[{i}]", address)


@dataclass(frozen=True)
class Hello:
    """A worker announces itself (at start, then every few heartbeats: a proxy that lost it
    registers it again). The proxy's rule for a Hello naming a registered worker is in
    proxy/cluster.py `register`."""

    worker_id: str = bounded(max_len=MAX_ID_LEN)
    role: str = bounded(max_len=16)  # "prefill" | "decode"
    ctrl_address: str = bounded(max_len=MAX_ADDRESS_LEN)
    kv_address: str = bounded(max_len=MAX_ADDRESS_LEN)
    kv_spec: KvSpec = bounded()
    plan: str = bounded(max_len=MAX_TEXT_LEN)
    pid: int = bounded(lo=1, hi=1 << 31)
    host: str = bounded(max_len=MAX_ADDRESS_LEN)
    model: str = bounded("", max_len=MAX_TEXT_LEN)
    # its scheduler's token budget per step (0: unknown)
    max_num_batched_tokens: int = bounded(0, lo=0, hi=MAX_COUNT)
    # tensor parallel: the pid of every rank of this worker, rank 0 (pid) first
    rank_pids: list[int] = bounded([], lo=1, hi=1 << 31, max_len=MAX_TP_RANKS)
    # tensor parallel decode: every rank's KV receiver, rank 0 (kv_address) first; each rank's
    # spec is kv_spec with its tp_rank (empty: one receiver, kv_address)
    kv_rank_addresses: list[str] = bounded([], max_len=MAX_TP_RANKS)

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id is empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be prefill or decode, got {self.role!r:.20}")
        _check_address("ctrl_address", self.ctrl_address)
        if self.role == "decode":  # where prefill workers send KV (a prefill worker binds none)
            _check_address("kv_address", self.kv_address)
        check_rank_addresses(self.kv_rank_addresses, self.kv_address, self.kv_spec)

    @property
    def identity(self) -> tuple[str, str, int, str, str]:
        """What tells one worker process from another with the same id."""
        return self.role, self.host, self.pid, self.ctrl_address, self.kv_address


@dataclass(frozen=True)
class Heartbeat:
    worker_id: str = bounded(max_len=MAX_ID_LEN)
    role: str = bounded(max_len=16)
    num_running: int = bounded(lo=0, hi=MAX_COUNT)
    num_waiting: int = bounded(lo=0, hi=MAX_COUNT)
    num_used_blocks: int = bounded(lo=0, hi=MAX_COUNT)
    num_free_blocks: int = bounded(lo=0, hi=MAX_COUNT)
    num_blocks: int = bounded(lo=0, hi=MAX_COUNT)
    num_preemptions: int = bounded(0, lo=0, hi=MAX_COUNT)
    # since the last heartbeat (cost models)
    steps: list[StepStats] = bounded([], max_len=256)
    # running totals, by plane/reason
    rejected: list[RejectedCount] = bounded([], max_len=256)
    pid: int = bounded(0, lo=0, hi=1 << 31)  # the sender's process (0: not said)


@dataclass(frozen=True)
class Reserved:
    request_id: str = bounded(max_len=MAX_ID_LEN)
    worker_id: str = bounded(max_len=MAX_ID_LEN)
    block_ids: list[int] = bounded(lo=0, max_len=MAX_LIST)


@dataclass(frozen=True)
class Rejected:
    request_id: str = bounded(max_len=MAX_ID_LEN)
    worker_id: str = bounded(max_len=MAX_ID_LEN)
    reason: str = bounded(max_len=MAX_TEXT_LEN)
    status: int = bounded(503, lo=400, hi=599)
    retry_after_s: float = bounded(1.0, lo=0.0, hi=3600.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", _cut(self.reason))


@dataclass(frozen=True)
class Tokens:
    """New output tokens of one request; `logprobs[i]` is token i's when they were asked for."""

    request_id: str = bounded(max_len=MAX_ID_LEN)
    worker_id: str = bounded(max_len=MAX_ID_LEN)
    token_ids: list[int] = bounded(lo=0, max_len=MAX_LIST)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = bounded(0, lo=0, hi=MAX_COUNT)
    num_cached_tokens: int = bounded(0, lo=0, hi=MAX_COUNT)
    # workers leave it empty (they send PromptLogprobs parts); the proxy's cluster client puts
    # the assembled prompt logprobs on the first event it hands on
    prompt_logprobs: list[TokenLogprob] = bounded([], max_len=MAX_LIST)


@dataclass(frozen=True)
class PromptLogprobs:
    """Prompt logprobs of a request that asked for them, from the worker that prefilled it
    (entry e: prompt token e + 1's), in parts of a few KiB (`prompt_logprobs_events`; an event
    frame is at most 64 KiB): entries [start, start + len(logprobs)); `is_last` on the final
    part. Sent before the request's first token leaves that worker (a prefill worker: before
    its KV; a decode worker prefilling locally: before its first Tokens, on the same socket)."""

    request_id: str = bounded(max_len=MAX_ID_LEN)
    worker_id: str = bounded(max_len=MAX_ID_LEN)
    logprobs: list[TokenLogprob] = bounded(max_len=MAX_LIST)
    start: int = bounded(0, lo=0, hi=MAX_COUNT)
    is_last: bool = True


PROMPT_LOGPROBS_PART_BYTES = 24 << 10  # of one PromptLogprobs event, roughly


def prompt_logprobs_events(request_id: str, worker_id: str, logprobs: list[TokenLogprob],
                           top_n: int) -> list[PromptLogprobs]:
    """`logprobs` as PromptLogprobs events, each well under the 64 KiB event frame (an entry
    with n alternatives is at most ~40 + 16 n bytes of msgpack)."""
    per_event = max(1, PROMPT_LOGPROBS_PART_BYTES // (48 + 16 * top_n))
    starts = range(0, max(len(logprobs), 1), per_event)
    return [PromptLogprobs(request_id, worker_id, logprobs[i:i + per_event], i,
                           i + per_event >= len(logprobs)) for i in starts]


@dataclass(frozen=True)
class PrefillDone:
    request_id: str = bounded(max_len=MAX_ID_LEN)
    worker_id: str = bounded(max_len=MAX_ID_LEN)
    num_cached_tokens: int = bounded(lo=0, hi=MAX_COUNT)
    kv_bytes: int = bounded(lo=0, hi=1 << 50)
    kv_seconds: float = bounded(lo=0.0, hi=1e6)


@dataclass(frozen=True)
class RequestFailed:
    """A request failed on a worker: why (`code`) and the worker's words for it (`error`)."""

    request_id: str = bounded(max_len=MAX_ID_LEN)
    worker_id: str = bounded(max_len=MAX_ID_LEN)
    error: str = bounded(max_len=MAX_TEXT_LEN)
    code: ErrorCode = ErrorCode.INTERNAL

    def __post_init__(self) -> None:
        object.__setattr__(self, "error", _cut(self.error))

    @property
    def retryable(self) -> bool:
        """Another worker may redo the failed step (follows from the code alone)."""
        return self.code.retryable


WORKER_EVENTS = MessageFamily(
    "workers->proxy", (Hello, Heartbeat, Reserved, Rejected, Tokens, PromptLogprobs, PrefillDone,
                       RequestFailed))
