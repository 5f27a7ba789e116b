"""What the engine reports about each output token besides its id: its logprob
(`TokenLogprob`) and why a sequence ended (`FinishReason`).

Torch-free on purpose: both travel as they are on the control plane (the prefill worker's first
token in the KV header's meta, the decode worker's `Tokens` events) and the proxy reads them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos or a stop token id
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's logprob and the top alternatives `(token_id, logprob)`, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int = 0  # 1 = the most likely token; 0 = not computed (sampled tokens)
