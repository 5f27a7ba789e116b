"""Channel proxy -> decode worker (ctrl): what a decode worker is asked to do.

Replies travel on the workers -> proxy channel (protocol/worker_events.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from protocol.bounds import MAX_ID_LEN, MAX_KV_TOKEN_LEN, MAX_MODEL_LEN, VOCAB_SIZE, bounded
from protocol.codec import MessageFamily
from protocol.lifecycle_ctrl import Abort, AbortAll, Shutdown

MAX_QUEUE_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Reserve:
    """Reserve blocks for a prompt (decode-first). With `remote_prefill` False the decode worker
    prefills locally (colocated). Reply: Reserved (remote) or Tokens (local), or Rejected."""

    request_id: str = bounded(max_len=MAX_ID_LEN)
    prompt_ids: list[int] = bounded(lo=0, below=VOCAB_SIZE, max_len=MAX_MODEL_LEN)
    params: SamplingParams = bounded()  # its own bounds: engine/sampling_params.py
    remote_prefill: bool = True
    queue_timeout_s: float = bounded(30.0, lo=0.0, hi=MAX_QUEUE_TIMEOUT_S)
    # local prefill: most prompt tokens per step (0: the step's budget)
    prefill_chunk: int = bounded(0, lo=0, hi=MAX_MODEL_LEN)
    # the reservation token the KV transfer must carry (the proxy's, random)
    kv_token: str = bounded("", max_len=MAX_KV_TOKEN_LEN)


@dataclass(frozen=True)
class PrefillLocally:
    """The prefill worker is gone: turn the reservation into a local prefill."""

    request_id: str = bounded(max_len=MAX_ID_LEN)


DECODE_CTRL = MessageFamily("proxy->decode", (Reserve, PrefillLocally, Abort, AbortAll, Shutdown))

__all__ = ["DECODE_CTRL", "Abort", "AbortAll", "PrefillLocally", "Reserve", "Shutdown"]
