"""A sequence: one request's tokens, its block table and its progress through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.outputs import FinishReason, TokenLogprob
from engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def draw_seed(seed: int, index: int) -> int:
    """The seed of output token `index` of a request seeded with `seed` (splitmix64 of both:
    neighbouring seeds and positions give unrelated streams)."""
    z = (((seed & _MASK64) ^ (((index + 1) * _GOLDEN) & _MASK64)) + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Token ids (prompt + output), KV progress and the blocks that hold them.

    `num_computed_tokens` counts tokens whose K/V is in the cache; the tokens after it are
    fed to the model in the next step (a prefill chunk, or the last sampled token).
    """

    seq_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = -1
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # entry e: token e + 1's
    prefill_chunk: int = 0  # most prompt tokens per step while it prefills (0: no cap)
    _generator: torch.Generator | None = field(default=None, repr=False, compare=False)
    # the grammar matcher of a guided request (engine/grammar_runtime.py), built on first use
    grammar: object | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def generator(self) -> torch.Generator | None:
        """The generator for the next output token's draw (None without a seed), seeded from
        (seed, output index): each draw depends only on the request's seed and the token's
        position, so a token drawn on a prefill worker, a decode worker or after a preemption
        is the one the colocated engine draws."""
        if self.params.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator()
        return self._generator.manual_seed(draw_seed(self.params.seed, self.num_output_tokens))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
