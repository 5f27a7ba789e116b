"""A token's own bytes, as OpenAI's logprob `bytes` reports them.

Decoding one token alone turns a piece of a multi-byte character into U+FFFD; its bytes are
the piece itself. Byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3, Qwen2) spell each byte
as one printable character (`bytes_to_unicode`); SentencePiece vocabularies spell a space as
U+2581 and fall back to tokens `<0xE2>` for bytes they do not hold. Added (special) tokens are
their text.
"""

from __future__ import annotations

import json
import re

from tokenizers import Tokenizer as BackendTokenizer

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPM_SPACE = "\u2581"


class TokenBytes:
    """Maps token ids to their bytes for one tokenizer (built once: it reads the decoder type
    and the added tokens)."""

    def __init__(self, backend: BackendTokenizer, byte_decoder: dict[str, int]) -> None:
        self.backend = backend
        self.byte_decoder = byte_decoder
        self.is_byte_level = _is_byte_level(backend)
        self.added_ids = frozenset(backend.get_added_tokens_decoder())

    def __call__(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for (b"" for an id outside the vocabulary)."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self.added_ids:
            return piece.encode()
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        if self.is_byte_level and all(c in self.byte_decoder for c in piece):
            return bytes(self.byte_decoder[c] for c in piece)
        return piece.replace(_SPM_SPACE, " ").encode()


def _is_byte_level(backend: BackendTokenizer) -> bool:
    """Whether the tokenizer's decoder is (or holds) a byte-level one."""
    if backend.decoder is None:
        return False
    return '"ByteLevel"' in json.dumps(json.loads(backend.decoder.__getstate__()))
