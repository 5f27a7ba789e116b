"""Channel proxy -> decode worker (ctrl): what a decode worker is asked to do.

Replies travel on the workers -> proxy channel (protocol/worker_events.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from protocol.codec import MessageFamily
from protocol.lifecycle_ctrl import Abort, AbortAll, Shutdown


@dataclass(frozen=True)
class Reserve:
    """Reserve blocks for a prompt (decode-first). With `remote_prefill` False the decode worker
    prefills locally (colocated). Reply: Reserved (remote) or Tokens (local), or Rejected."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    remote_prefill: bool = True
    queue_timeout_s: float = 30.0
    prefill_chunk: int = 0  # local prefill: most prompt tokens per step (0: the step's budget)
    kv_token: str = ""  # the reservation token the KV transfer must carry (the proxy's, random)


@dataclass(frozen=True)
class PrefillLocally:
    """The prefill worker is gone: turn the reservation into a local prefill."""

    request_id: str


DECODE_CTRL = MessageFamily("proxy->decode", (Reserve, PrefillLocally, Abort, AbortAll, Shutdown))

__all__ = ["DECODE_CTRL", "Abort", "AbortAll", "PrefillLocally", "Reserve", "Shutdown"]
