"""Tokenizer and chat template for a checkpoint.

Owns text <-> token ids and chat rendering: a `Tokenizer` wraps a `tokenizers.Tokenizer` built
either from an HF directory (tokenizer.json + tokenizer_config.json / chat_template.jinja) or from
GGUF metadata (byte-level BPE from `tokenizer.ggml.tokens` + `tokenizer.ggml.merges`, with the
pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`). Chat templates render in a sandboxed
jinja2 environment configured like Hugging Face's. Weights are not touched here.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from engine import content_tokens
from engine.config import ConfigError
from engine.gguf_loader import GgufFile, read_gguf
from engine.token_bytes import TokenBytes

# Tokens that close a chat turn; when a template uses one, generation stops on it too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<|eom_id|>")
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp `tokenizer.ggml.pre` -> regexes applied in order before the byte-level mapping.
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class TokenizerError(ConfigError):
    """A tokenizer or chat template that cannot be built or used."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> ids plus the chat template. Immutable after construction; safe to share."""

    def __init__(self, backend: BackendTokenizer, *, chat_template: str | None = None,
                 special_tokens: dict[str, str | None] | None = None,
                 extra_eos_ids: tuple[int, ...] = ()) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._extra_eos_ids = extra_eos_ids

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json + (optional) tokenizer_config.json / chat_template.jinja in `path`."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"{path} has no tokenizer.json; save one with "
                                 "AutoTokenizer.from_pretrained(...).save_pretrained(dir)")
        backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        special = {k: _token_content(config.get(k))
                   for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(backend, chat_template=_hf_chat_template(path, config), special_tokens=special)

    @classmethod
    def from_gguf(cls, source: str | Path | GgufFile | Any) -> Tokenizer:
        """From GGUF metadata: a path, a parsed `GgufFile`, or a `gguf.GGUFReader`."""
        if isinstance(source, (str, Path)):
            source = read_gguf(source)
        if isinstance(source, GgufFile):
            meta = source.metadata
        else:  # gguf.GGUFReader
            meta = {k: f.contents() for k, f in source.fields.items() if k.startswith("tokenizer.")}
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(f"GGUF tokenizer type {kind!r} is not supported (only byte-level "
                                 "BPE, 'gpt2'); load the model from its HF directory instead")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        backend = _byte_level_bpe(tokens, meta)

        def token(key: str) -> str | None:
            idx = meta.get(f"tokenizer.ggml.{key}")
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                   "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
        eot = meta.get("tokenizer.ggml.eot_token_id")
        return cls(backend, chat_template=meta.get("tokenizer.chat_template"),
                   special_tokens=special, extra_eos_ids=() if eot is None else (int(eot),))

    # ---- ids ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True,
               parse_special: bool = True) -> list[int]:
        """Ids for `text`; special tokens written in the text map to their ids (with
        `parse_special=False`, they are encoded as the plain text they are). Adds BOS only
        when the checkpoint's tokenizer does (its post-processor) and `add_special_tokens`.
        Releases the GIL while it encodes (`encode_batch` does; `encode` does not), so other
        threads run meanwhile."""
        backend = self.backend if parse_special else self._plain_backend
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @cached_property
    def _plain_backend(self) -> BackendTokenizer:
        """A copy that never parses special tokens in text (`encode_special_tokens`); a copy,
        so that the shared backend is never switched while another thread encodes."""
        plain = BackendTokenizer.from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain

    @cached_property
    def _special_pattern(self) -> Any:
        decoder = self.backend.get_added_tokens_decoder()
        return content_tokens.special_pattern([t.content for t in decoder.values() if t.special])

    @cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes one token stands for: a text of more than
        `n * max_token_bytes` characters has more than `n` tokens (checked before encoding)."""
        texts = self.backend.decode_batch([[i] for i in range(self.vocab_size)],
                                          skip_special_tokens=False)
        return max(1, *(len(t.encode("utf-8", "replace")) for t in texts))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's spelling of a token (e.g. 'Ġthe'), None outside it."""
        return self.backend.id_to_token(token_id)

    @cached_property
    def _token_bytes(self) -> TokenBytes:
        return TokenBytes(self.backend, {c: b for b, c in bytes_to_unicode().items()})

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes (a piece of a multi-byte character is its bytes, not U+FFFD)."""
        return self._token_bytes(token_id)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.special_tokens.get("bos_token")
        return None if bos is None else self.backend.token_to_id(bos)

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The EOS id, then end-of-turn tokens the chat template writes (e.g. <|im_end|>)."""
        ids: list[int | None] = [self.token_to_id(self.special_tokens.get("eos_token", ""))]
        ids += list(self._extra_eos_ids)
        template = self.chat_template or ""
        ids += [self.token_to_id(t) for t in END_OF_TURN_TOKENS if t in template]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    @cached_property
    def all_special_ids(self) -> tuple[int, ...]:
        decoder = self.backend.get_added_tokens_decoder()
        return tuple(sorted(i for i, tok in decoder.items() if tok.special))

    # ---- chat ---------------------------------------------------------------------------
    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if not self.chat_template:
            raise TokenizerError("this model has no chat template (no tokenizer.chat_template in "
                                 "the GGUF, no chat_template in tokenizer_config.json); use "
                                 "/v1/completions with a raw prompt, or pick an instruct model")
        try:
            return _chat_environment().from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"the model's chat template does not parse: {e}") from e

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) to the prompt text; `tools`
        (OpenAI tool definitions) go to templates that render them."""
        extra = {} if tools is None else {"tools": tools}
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **extra, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template rejected the messages: {e}") from e

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    special_in_content: bool = False,
                    add_special_tokens: bool = True) -> list[int]:
        """Ids of the rendered chat. Special tokens written inside message content are encoded
        as text (no role injection) unless `special_in_content`; the template's own control
        tokens stay special (engine/content_tokens.py)."""
        def render(msgs: list[dict[str, str]]) -> str:
            return self.apply_chat_template(msgs, add_generation_prompt)

        if special_in_content:
            return self.encode(render(messages), add_special_tokens)
        return content_tokens.encode_chat(messages, render, self.backend, self._plain_backend,
                                          self._special_pattern, add_special_tokens)


def _hf_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja (transformers >= 4.43 writes it) or tokenizer_config's chat_template."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if (path / "chat_template.json").is_file() and template is None:
        template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get(
            "chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _byte_level_bpe(tokens: list[str], meta: dict[str, Any]) -> BackendTokenizer:
    """GPT-2 style byte-level BPE from llama.cpp's vocabulary, merges and token types."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    splits = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre", "default"), (_GPT2_SPLIT,))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types, strict=False)
                                if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types, strict=False) if kind == _USER_DEFINED])
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return backend


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """A sandboxed jinja2 environment with the helpers Hugging Face chat templates expect."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
