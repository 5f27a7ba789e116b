"""Channel proxy -> prefill worker (ctrl): prompts to prefill and where their KV must land."""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_spec import KvSpec
from engine.sampling_params import SamplingParams
from protocol.bounds import (
    MAX_ADDRESS_LEN,
    MAX_ID_LEN,
    MAX_KV_TOKEN_LEN,
    MAX_MODEL_LEN,
    VOCAB_SIZE,
    bounded,
)
from protocol.codec import MessageFamily
from protocol.lifecycle_ctrl import Abort, AbortAll, Shutdown
from protocol.worker_events import MAX_TP_RANKS, check_rank_addresses


@dataclass(frozen=True)
class Prefill:
    """Prefill `prompt_ids`, sample the first token, send KV + first token to the decode
    worker's reservation (`block_ids` on the cache described by `kv_spec`) at `kv_address`,
    with the reservation's `kv_token` in the KV header (the decode worker refuses any other).

    Ownership: the prefill worker owns its own blocks until the decode worker acks (or the
    transfer fails / times out); the destination blocks belong to the decode worker throughout.
    """

    request_id: str = bounded(max_len=MAX_ID_LEN)
    prompt_ids: list[int] = bounded(lo=0, below=VOCAB_SIZE, max_len=MAX_MODEL_LEN)
    params: SamplingParams = bounded()
    decode_id: str = bounded(max_len=MAX_ID_LEN)
    kv_address: str = bounded(max_len=MAX_ADDRESS_LEN)
    block_ids: list[int] = bounded(lo=0, max_len=MAX_MODEL_LEN)  # a block holds >= 1 token
    kv_spec: KvSpec = bounded()
    kv_token: str = bounded("", max_len=MAX_KV_TOKEN_LEN)  # the KV header carries it (`rtok`)
    # a tensor-parallel decode worker: every rank's KV receiver, kv_address first (Hello's)
    kv_rank_addresses: list[str] = bounded([], max_len=MAX_TP_RANKS)

    def __post_init__(self) -> None:
        check_rank_addresses(self.kv_rank_addresses, self.kv_address, self.kv_spec)
        if self.kv_spec.tp_size > 1 and not self.kv_rank_addresses:
            raise ValueError(f"kv_rank_addresses: kv_spec.tp_size is {self.kv_spec.tp_size} "
                             f"but no rank addresses were given")


PREFILL_CTRL = MessageFamily("proxy->prefill", (Prefill, Abort, AbortAll, Shutdown))

__all__ = ["PREFILL_CTRL", "Abort", "AbortAll", "Prefill", "Shutdown"]
