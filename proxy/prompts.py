"""Prompts to token ids, bounded and off the event loop.

Owns `PromptEncoder`: it caps a prompt's length *before* tokenizing (a text of more than
`max_model_len * tokenizer.max_token_bytes` characters cannot fit, whatever it encodes to; a
token-id list longer than `max_model_len` neither), checks ids against the vocabulary, and runs
the chat template and the tokenizer in a small thread pool of its own (`--tokenizer-threads`),
so a long prompt never stalls other requests, `/health` or the token streams. Special tokens
written in chat content are encoded as text unless `--allow-special-tokens-in-content`; in a
/v1/completions prompt they are parsed (as vLLM does) unless
`--no-allow-special-tokens-in-prompt`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from proxy.detokenizer import TokenDecoder
from proxy.errors import ApiError, context_length_exceeded, invalid_request
from proxy.limits import HttpLimits

T = TypeVar("T")


class PromptTokenizer(TokenDecoder, Protocol):
    """What the proxy needs to turn prompts into ids (engine/tokenizer.py's `Tokenizer`)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_token_bytes(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True,  # type: ignore[override]
               parse_special: bool = True) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    special_in_content: bool = False) -> list[int]: ...


class PromptEncoder:
    """Bounded prompt -> ids for both endpoints. Thread pool owned here; `close()` ends it."""

    def __init__(self, tokenizer: PromptTokenizer, max_model_len: int,
                 limits: HttpLimits) -> None:
        self.tokenizer, self.max_model_len, self.limits = tokenizer, max_model_len, limits
        self.max_prompt_chars = max_model_len * tokenizer.max_token_bytes
        self._pool = ThreadPoolExecutor(limits.tokenizer_threads,
                                        thread_name_prefix="pdserve-tokenize")

    async def completion_ids(self, prompt: str | list[int]) -> list[int]:
        """A completion's prompt (a string or token ids) as ids; 400 when it cannot fit."""
        if isinstance(prompt, str):
            self._check_chars(len(prompt), "prompt")
            parse = self.limits.allow_special_tokens_in_prompt
            return await self.run(lambda: self.tokenizer.encode(prompt, parse_special=parse),
                                   "prompt")
        if len(prompt) >= self.max_model_len:
            raise context_length_exceeded(len(prompt), None, self.max_model_len)
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid_request(f"token id {bad} is outside the vocabulary (0..{vocab - 1})",
                                  "prompt")
        return list(prompt)

    async def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template applied and tokenized; 400 when the template refuses or the
        messages cannot fit."""
        self._check_chars(sum(len(m.get("content") or "") for m in messages), "messages")
        special = self.limits.allow_special_tokens_in_content
        return await self.run(
            lambda: self.tokenizer.encode_chat(messages, special_in_content=special), "messages")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise invalid_request(
                f"The {param} has {num_chars} characters: more than this model's maximum context "
                f"length ({self.max_model_len} tokens, the server's --max-model-len) can hold "
                f"at {self.tokenizer.max_token_bytes} bytes per token at most. Please shorten "
                f"the {param}.", param, "context_length_exceeded")

    async def run(self, work: Callable[[], T], param: str) -> T:
        """`work` on the pool; a Unicode or chat-template failure is a 400 naming `param`."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)
        except ApiError:
            raise
        except UnicodeError as e:  # e.g. a lone surrogate that got past validation
            raise invalid_request(f"the {param} is not valid Unicode text: {e}", param) from None
        except Exception as e:  # template errors are the request's fault (raise_exception)
            if param == "messages":
                raise invalid_request(f"chat template rejected the messages: {e}",
                                      param) from None
            raise
