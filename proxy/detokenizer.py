"""Incremental detokenization of one request's generated tokens.

Owns `IncrementalDetokenizer`: token ids arrive a few at a time; it returns only the text that
is final. Byte-level BPE splits multi-byte characters (emoji, CJK, accents) across tokens, so a
prefix of the ids can decode to a broken character (U+FFFD); such a tail is held back until the
character completes. Tokenizers whose decoding of a token depends on its neighbours (merges,
leading-space rules) are handled with vLLM's two offsets: every step decodes a short window
twice — `ids[prefix:read]` (already emitted) and `ids[prefix:]` — and emits the difference.

Only the tokenizer's `decode` is used; the ids window is trimmed as text is emitted, so memory
stays small however long the generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class TokenDecoder(Protocol):
    """What the proxy needs from a tokenizer (HF tokenizers and `tokenizers.Tokenizer` fit)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def encode(self, text: str) -> list[int]: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas for one request.

    `prompt_ids`: the last few prompt tokens give the first generated tokens their left context
    (e.g. whether a leading space is kept). Contract: the concatenation of every `push()` and the
    final `flush()` equals the text of the generated ids, and no delta ends inside a multi-byte
    character unless the generation itself ends there (then `flush()` returns it).
    """

    PROMPT_CONTEXT_TOKENS = 5  # as vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET

    def __init__(
        self,
        tokenizer: TokenDecoder,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids or [])[-self.PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = context  # a window: [prefix_offset ... end]
        self._prefix_offset = 0  # start of the already-emitted context decoded each step
        self._read_offset = len(context)  # ids before this are already emitted
        self.num_output_tokens = 0

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated ids; return the newly final text (maybe "")."""
        self._ids.extend(token_ids)
        self.num_output_tokens += len(token_ids)
        return self._advance(is_final=False)

    def flush(self) -> str:
        """End of generation: return whatever was held back, broken characters included."""
        return self._advance(is_final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, is_final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        is_complete = not full_text.endswith(REPLACEMENT_CHAR)
        if len(full_text) <= len(prefix_text) or not (is_complete or is_final):
            if is_final:  # nothing visible came of the rest (special tokens, say)
                self._forget_emitted(len(self._ids))
            return ""
        delta = full_text[len(prefix_text):]
        self._forget_emitted(len(self._ids))
        return delta

    def _forget_emitted(self, new_read_offset: int) -> None:
        """Everything before `new_read_offset` is emitted: slide the window forward."""
        self._prefix_offset = self._read_offset
        self._read_offset = new_read_offset
        del self._ids[:self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
