"""Channel proxy -> prefill worker (ctrl): prompts to prefill and where their KV must land."""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_spec import KvSpec
from engine.sampling_params import SamplingParams
from protocol.codec import MessageFamily
from protocol.lifecycle_ctrl import Abort, AbortAll, Shutdown


@dataclass(frozen=True)
class Prefill:
    """Prefill `prompt_ids`, sample the first token, send KV + first token to the decode
    worker's reservation (`block_ids` on the cache described by `kv_spec`) at `kv_address`,
    with the reservation's `kv_token` in the KV header (the decode worker refuses any other).

    Ownership: the prefill worker owns its own blocks until the decode worker acks (or the
    transfer fails / times out); the destination blocks belong to the decode worker throughout.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    decode_id: str
    kv_address: str
    block_ids: list[int]
    kv_spec: KvSpec
    kv_token: str = ""  # the reservation's token: the KV header carries it (`rtok`)


PREFILL_CTRL = MessageFamily("proxy->prefill", (Prefill, Abort, AbortAll, Shutdown))

__all__ = ["PREFILL_CTRL", "Abort", "AbortAll", "Prefill", "Shutdown"]
