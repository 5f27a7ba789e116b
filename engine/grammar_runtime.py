"""Grammar matchers for guided requests: compile (cached), follow the output, build token masks.

One `GrammarRuntime` per engine owns the llguidance tokenizer (built once from the checkpoint's
tokenizer) and a bounded LRU of compiled grammars (a fresh matcher per spec; each sequence gets
a `deep_copy`). A sequence's matcher lives on the sequence (`Sequence.grammar`) and is advanced
lazily, before each sample, by the output tokens it has not consumed yet. So the state crosses
every boundary without travelling: a decode worker that adopts a prefilled sequence (prompt +
the first token the prefill worker sampled under the same grammar) builds its matcher from the
compiled grammar and advances it by that first token; a recomputed (preempted) sequence keeps
its matcher.

The mask is a packed bitmask `[N, ceil(V / 32)]` int32 on the host (bit t of word t // 32 set:
token t allowed); the sampler unpacks and applies it on the logits' device. A matcher in an
error state (a grammar the engine cannot compile, which the proxy's check should have refused)
allows only the end-of-sequence tokens, so the request ends instead of producing junk.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from llguidance import LLMatcher, LLTokenizer

from engine.errors import RequestError
from engine.guided import GuidedDecoding, to_grammar
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_CACHED_GRAMMARS = 64


@dataclass
class GrammarState:
    """A sequence's matcher and how many of its output tokens it has consumed."""

    matcher: LLMatcher
    num_consumed: int = 0

    def follow(self, output_ids: list[int]) -> None:
        new = output_ids[self.num_consumed:]
        if new and not self.matcher.is_error():
            self.matcher.consume_tokens(new)
        self.num_consumed = len(output_ids)


class GrammarRuntime:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...],
                 max_cached: int = DEFAULT_MAX_CACHED_GRAMMARS) -> None:
        self._tokenizer = tokenizer
        self._eos = list(eos_token_ids)
        self._max_cached = max_cached
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lltokenizer: LLTokenizer | None = None

    @property
    def lltokenizer(self) -> LLTokenizer:
        if self._lltokenizer is None:  # ~0.2 s; only engines that see a guided request pay it
            self._lltokenizer = LLTokenizer(self._tokenizer.backend.to_str(),
                                            n_vocab=self._tokenizer.vocab_size,
                                            eos_token=self._eos)
        return self._lltokenizer

    @property
    def num_words(self) -> int:
        return (self.lltokenizer.vocab_size + 31) // 32

    def compiled(self, guided: GuidedDecoding) -> LLMatcher:
        """The compiled grammar of `guided` (a fresh matcher; copy it before use)."""
        key = guided.cache_key
        matcher = self._compiled.get(key)
        if matcher is not None:
            self._compiled.move_to_end(key)
            return matcher
        try:
            grammar = to_grammar(guided)
        except RequestError as e:  # the proxy checks first; a direct engine user may not
            log.warning("guided spec rejected on the worker, the request ends at once: %s", e)
            grammar = LLMatcher.grammar_from_regex("")  # matches only the empty output
        matcher = LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            log.warning("grammar does not compile, the request ends at once: %s",
                        matcher.get_error())
        self._compiled[key] = matcher
        if len(self._compiled) > self._max_cached:
            self._compiled.popitem(last=False)
        return matcher

    def state(self, seq: Sequence) -> GrammarState:
        state = seq.grammar
        if not isinstance(state, GrammarState) and seq.params.guided is not None:
            state = GrammarState(self.compiled(seq.params.guided).deep_copy())
            seq.grammar = state
        if not isinstance(state, GrammarState):
            raise RequestError(f"sequence {seq.seq_id} has no guided decoding spec")
        state.follow(seq.output_ids)
        return state

    def bitmask(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """[N, words] int32 allowed-token bitmask (all ones for unguided rows), or None when no
        sequence is guided. Advances each guided matcher by its new output tokens first."""
        if not any(s.params.guided is not None for s in seqs):
            return None
        mask = torch.full((len(seqs), self.num_words), -1, dtype=torch.int32)
        row_bytes = self.num_words * 4
        for i, seq in enumerate(seqs):
            if seq.params.guided is None:
                continue
            matcher = self.state(seq).matcher
            if matcher.is_error():
                mask[i] = 0
                for t in self._eos:
                    mask[i, t // 32] |= _bit(t % 32)
                continue
            matcher.unsafe_compute_mask_ptr(mask[i].data_ptr(), row_bytes)
        return mask


def _bit(index: int) -> int:
    """Bit `index` of an int32 word as a Python int in int32 range."""
    return -(1 << 31) if index == 31 else 1 << index


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [N, V] with disallowed tokens at -inf; bitmask [N, words] int32 (host or device).
    Tokens past the mask (a vocabulary padded beyond the tokenizer's) are disallowed."""
    num_rows, vocab = logits.shape
    mask = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = ((mask[:, :, None] >> shifts) & 1).reshape(num_rows, -1).bool()  # [N, words * 32]
    if bits.shape[1] < vocab:
        bits = torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]))
    return logits.masked_fill(~bits[:, :vocab], float("-inf"))
