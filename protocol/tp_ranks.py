"""Channel rank 0 -> follower ranks of one tensor-parallel worker: their KV endpoints' work.

A tensor-parallel worker's KV cache is spread over its ranks (each holds its KV heads of every
block), so each rank runs its own KV endpoint (decode/tp_rank.py, prefill/tp_rank.py). Rank 0
alone talks to the proxy and owns the block tables; it tells the followers what to expect or
send with these messages, carried as bytes on the group's step broadcast (engine/tp_service.py).
Followers answer a `RankPoll` with a sum over the group of one int64 row per `POLL_ROWS` entry
and one column per slot (`poll_rows`): each request in flight has a slot number rank 0 chose.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_spec import KvSpec
from protocol.bounds import MAX_ADDRESS_LEN, MAX_ID_LEN, MAX_KV_TOKEN_LEN, bounded
from protocol.codec import MessageFamily

MAX_TP_RANKS = 1024
MAX_SLOTS = 1 << 16  # requests in flight that one poll asks about
MAX_BLOCKS = 1 << 21
# a poll's answer, summed over the ranks: per slot, how many ranks finished it, how many failed
# it, how many of those failures are not worth a retry, and the payload bytes they moved
POLL_ROWS = ("num_done", "num_failed", "num_fatal", "num_bytes")


@dataclass(frozen=True)
class KvExpect:
    """Decode followers: expect this reservation's KV (their heads) in `block_ids`, with the
    proxy's `kv_token`. Rank 0 waits for every follower to have expected it (an empty sum)
    before it tells the proxy where to send."""

    slot: int = bounded(lo=0, hi=1 << 62)
    request_id: str = bounded(max_len=MAX_ID_LEN)
    block_ids: list[int] = bounded(lo=0, max_len=MAX_BLOCKS)
    kv_token: str = bounded("", max_len=MAX_KV_TOKEN_LEN)


@dataclass(frozen=True)
class KvForget:
    """Decode followers: withdraw slot `slot`'s expectation (abort, timeout, local prefill)."""

    slot: int = bounded(lo=0, hi=1 << 62)


@dataclass(frozen=True)
class KvSend:
    """Prefill followers: send this rank's heads of tokens [0, num_tokens) in `block_ids` to
    the decode worker whose rank-0 spec is `kv_spec` and whose ranks listen on `kv_addresses`
    (rank 0 first), each over its routes (transfer/convert/tp_routes.py)."""

    slot: int = bounded(lo=0, hi=1 << 62)
    request_id: str = bounded(max_len=MAX_ID_LEN)
    block_ids: list[int] = bounded(lo=0, max_len=MAX_BLOCKS)
    num_tokens: int = bounded(lo=1, hi=1 << 40)
    kv_spec: KvSpec = bounded()
    kv_addresses: list[str] = bounded([], max_len=MAX_TP_RANKS)
    kv_token: str = bounded("", max_len=MAX_KV_TOKEN_LEN)

    def __post_init__(self) -> None:
        if any(len(a) > MAX_ADDRESS_LEN for a in self.kv_addresses):
            raise ValueError(f"kv_addresses: an address is longer than {MAX_ADDRESS_LEN}")


@dataclass(frozen=True)
class StreamChunk:
    """One prompt chunk of the next model step whose KV streams layer group by layer group
    (`--kv-streaming layerwise`): tokens [token_start, token_end) in `block_ids`, to the decode
    worker of `kv_spec` / `kv_addresses` as in `KvSend`; `is_final`: the prompt's last chunk
    (its last group waits for `StreamEnd`). Slot `slot` tallies this rank's routes."""

    slot: int = bounded(lo=0, hi=1 << 62)
    request_id: str = bounded(max_len=MAX_ID_LEN)
    block_ids: list[int] = bounded(lo=0, max_len=MAX_BLOCKS)
    token_start: int = bounded(lo=0, hi=1 << 40)
    token_end: int = bounded(lo=1, hi=1 << 40)
    kv_spec: KvSpec = bounded()
    kv_addresses: list[str] = bounded([], max_len=MAX_TP_RANKS)
    kv_token: str = bounded("", max_len=MAX_KV_TOKEN_LEN)
    is_final: bool = False

    def __post_init__(self) -> None:
        if self.token_end <= self.token_start:
            raise ValueError(f"token_end {self.token_end} must exceed token_start "
                             f"{self.token_start}")
        if any(len(a) > MAX_ADDRESS_LEN for a in self.kv_addresses):
            raise ValueError(f"kv_addresses: an address is longer than {MAX_ADDRESS_LEN}")


@dataclass(frozen=True)
class StreamStep:
    """Prefill followers, before every model step of a layer-wise streaming worker: the chunks
    of that step whose KV streams (none: the step streams nothing)."""

    chunks: list[StreamChunk] = bounded([], max_len=MAX_SLOTS)


@dataclass(frozen=True)
class StreamEnd:
    """Prefill followers: a streamed request's end: its last part (the first token is sampled),
    or with `is_cancel` the stream's cancellation (abort, a failed part)."""

    request_id: str = bounded(max_len=MAX_ID_LEN)
    is_cancel: bool = False


@dataclass(frozen=True)
class RankPoll:
    """Every rank answers for each slot in `slots` (see POLL_ROWS), then forgets the slots
    the sum shows as over (decode: landed on every rank or failed on one; prefill: ended on
    every rank)."""

    slots: list[int] = bounded(lo=0, hi=1 << 62, max_len=MAX_SLOTS)


TP_RANKS = MessageFamily("rank0->ranks", (KvExpect, KvForget, KvSend, RankPoll, StreamChunk,
                                           StreamStep, StreamEnd))

__all__ = ["POLL_ROWS", "TP_RANKS", "KvExpect", "KvForget", "KvSend", "RankPoll", "StreamChunk",
           "StreamEnd", "StreamStep"]
