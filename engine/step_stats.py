"""What one model step held and how long it took: the samples the proxy fits its step-time
cost models to (proxy/cost_model.py). Torch-free, so the control plane can carry it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepStats:
    seconds: float  # wall time of the forward pass and sampling
    num_prefill_tokens: int  # prompt (or recomputed) tokens computed in chunks of more than one
    num_decode_seqs: int  # sequences that computed one token
    num_context_tokens: int  # tokens the step's attention read, over all its sequences

    def __post_init__(self) -> None:
        if not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(f"step seconds must be finite and >= 0, got {self.seconds}")
        if min(self.num_prefill_tokens, self.num_decode_seqs, self.num_context_tokens) < 0:
            raise ValueError(f"negative count in {self}")
