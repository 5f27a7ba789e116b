"""Tokenizer and chat template: ids, decoding and rendering equal transformers' on SmolLM2."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from engine.config import ConfigError
from engine.gguf_loader import read_gguf
from engine.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\n",
    "1234567890 3.14159 1,000,000",
    " 1 22 333 4444 55555",
    "abc123def456",
    "naïve café résumé façade",
    "日本語のテキストと中文",
    "Ελληνικά и русский текст",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧",
    "def f(x):\n    return x**2  # comment\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a<|endoftext|>b",
    "<repo_name>foo<file_sep>bar",
    "x  y   z    w\t\t\tv",
    "don't won't I'm we'll they've",
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n",
    "a\u00a0b\u200bc",
    '{"json": [1, 2, 3], "ok": true}',
    "\n\n  \n\t\t x",
    "   ",
    "",
]
MESSAGES = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2? Answer with ünïcödé 😀."},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers(text: str, tokenizer: Tokenizer, hf_smollm2_tokenizer: Any) -> None:
    ids = tokenizer.encode(text)
    assert ids == hf_smollm2_tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == hf_smollm2_tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_map_to_their_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.encode("<|endoftext|>") == [0]
    assert tokenizer.decode(tokenizer.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_properties(tokenizer: Tokenizer, hf_smollm2_tokenizer: Any) -> None:
    assert tokenizer.vocab_size == len(hf_smollm2_tokenizer) == 49152
    assert tokenizer.bos_token_id == hf_smollm2_tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == (2,)  # <|im_end|> is both EOS and the turn end
    assert tokenizer.all_special_ids == tuple(range(17))
    assert set(hf_smollm2_tokenizer.all_special_ids) <= set(tokenizer.all_special_ids)
    assert tokenizer.encode("Hello")[0] != tokenizer.bos_token_id  # no BOS added for SmolLM2


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(with_system: bool, add_generation_prompt: bool,
                                           tokenizer: Tokenizer, hf_smollm2_tokenizer: Any) -> None:
    system = [{"role": "system", "content": "Be brief."}] if with_system else []
    messages = system + MESSAGES
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = hf_smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert ("You are a helpful AI assistant named SmolLM" in ours) != with_system
    assert tokenizer.encode(ours) == hf_smollm2_tokenizer(ours)["input_ids"]


def test_from_gguf_reader_equals_from_path(smollm2_gguf_path: Path, tokenizer: Tokenizer) -> None:
    other = Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf_path))
    for text in TEXTS:
        assert other.encode(text) == tokenizer.encode(text)
    assert other.apply_chat_template(MESSAGES) == tokenizer.apply_chat_template(MESSAGES)


def test_from_hf_dir_equals_gguf(tiny_hf_checkpoint: Callable[[str], Path],
                                 tokenizer: Tokenizer) -> None:
    hf_dir = Tokenizer.from_hf_dir(tiny_hf_checkpoint("llama_gqa"))
    for text in TEXTS:
        assert hf_dir.encode(text) == tokenizer.encode(text)
    assert hf_dir.apply_chat_template(MESSAGES) == tokenizer.apply_chat_template(MESSAGES)
    assert hf_dir.eos_token_ids == tokenizer.eos_token_ids
    assert hf_dir.bos_token_id == tokenizer.bos_token_id


def test_add_bos_token_is_respected(smollm2_gguf_path: Path) -> None:
    gf = read_gguf(smollm2_gguf_path)
    meta = {**gf.metadata, "tokenizer.ggml.add_bos_token": True}
    with_bos = Tokenizer.from_gguf(dataclasses.replace(gf, metadata=meta))
    assert with_bos.encode("Hello")[0] == 1
    assert with_bos.encode("Hello")[1:] == Tokenizer.from_gguf(gf).encode("Hello")


def _tiny_backend() -> BackendTokenizer:
    return BackendTokenizer(models.WordLevel({"a": 0, "<eos>": 1}, unk_token="a"))


def test_missing_template_is_a_clear_error() -> None:
    tok = Tokenizer(_tiny_backend(), special_tokens={"eos_token": "<eos>"})
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)
    assert issubclass(TokenizerError, ConfigError)
    assert tok.eos_token_ids == (1,)


def test_template_helpers_and_sandbox() -> None:
    template = ("{% for m in messages %}\n"
                "  {% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\n"
                "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
                "{{ m | tojson }}\n{% endfor %}{{ eos_token }}")  # trim/lstrip_blocks as HF
    tok = Tokenizer(_tiny_backend(), chat_template=template, special_tokens={"eos_token": "<eos>"})
    out = tok.apply_chat_template([{"role": "user", "content": "é"}] * 3)
    assert out == '{"role": "user", "content": "é"}\n{"role": "user", "content": "é"}\n<eos>'
    with pytest.raises(TokenizerError, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    escape = Tokenizer(_tiny_backend(), chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError):
        escape.apply_chat_template(MESSAGES)


def test_unsupported_gguf_tokenizer_type(smollm2_gguf_path: Path) -> None:
    gf = read_gguf(smollm2_gguf_path)
    meta = {**gf.metadata, "tokenizer.ggml.model": "llama"}
    with pytest.raises(TokenizerError, match="'llama' is not supported"):
        Tokenizer.from_gguf(dataclasses.replace(gf, metadata=meta))
