"""bench/datasets.py: length distributions, reproducible workloads, prefix reuse, ShareGPT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.datasets import DatasetConfig, LengthDist, TextSizer, build_dataset


class CharTokenizer:
    """One token per character: a tokenizer whose counts are easy to check."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


@pytest.mark.parametrize(("spec", "lo", "hi"), [("32", 32, 32), ("uniform:8:16", 8, 16),
                                                ("normal:50:10", 1, 200), ("exp:20", 1, 1000)])
def test_length_dist_samples_within_bounds(spec: str, lo: int, hi: int) -> None:
    x = LengthDist.parse(spec).sample(np.random.default_rng(0), 500)
    assert x.dtype == np.int64 and x.min() >= lo and x.max() <= hi
    assert str(LengthDist.parse(spec)) == spec


@pytest.mark.parametrize("spec", ["", "0", "-3", "abc", "uniform:9:3", "uniform:4", "exp:0",
                                  "beta:1:2", "32:5"])
def test_length_dist_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="bad length"):
        LengthDist.parse(spec)


def test_text_sizer_hits_the_token_count_exactly_with_a_tokenizer() -> None:
    sizer, rng = TextSizer(CharTokenizer()), np.random.default_rng(1)
    for n in (1, 7, 100):
        text, count = sizer.text(rng, n)
        assert count == len(text) == n
    words, count = TextSizer(None).text(rng, 12)
    assert count == 12 and len(words.split()) == 12


def test_synthetic_is_reproducible_from_the_seed() -> None:
    cfg = DatasetConfig(num_prompts=20, input_len="uniform:5:50", output_len="uniform:2:9")
    a, b = build_dataset(cfg, None, seed=3), build_dataset(cfg, None, seed=3)
    assert a == b and len(a) == 20
    assert a != build_dataset(cfg, None, seed=4)
    assert all(5 <= r.num_prompt_tokens <= 50 and 2 <= r.max_tokens <= 9 for r in a)
    assert all(r.prompt == r.messages[0]["content"] and r.messages[0]["role"] == "user" for r in a)
    assert len({r.prompt for r in a}) == 20  # distinct prompts: no accidental prefix-cache hits


def test_multiturn_turns_extend_the_previous_turn() -> None:
    cfg = DatasetConfig(dataset="multiturn", num_prompts=10, num_turns=3, input_len="6",
                        output_len="4", system_prompt_len=8)
    reqs = build_dataset(cfg, CharTokenizer(), seed=0)
    assert len(reqs) == 10
    assert [r.turn for r in reqs] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]  # all first turns first
    system = reqs[0].messages[0]
    assert system["role"] == "system" and all(r.messages[0] == system for r in reqs)
    by_key = {(r.conversation, r.turn): r for r in reqs}
    for (conv, turn), r in by_key.items():
        assert ([m["role"] for m in r.messages]
                == ["system"] + ["user", "assistant"] * turn + ["user"])
        assert r.num_prompt_tokens == 8 + 6 * (turn + 1) + 4 * turn
        nxt = by_key.get((conv, turn + 1))
        if nxt is not None:  # the next turn resends this one: prefix reuse
            assert nxt.messages[: len(r.messages)] == r.messages
            assert nxt.prompt.startswith(r.prompt.removesuffix("\nassistant:"))
    assert all(r.prompt.endswith("\nassistant:") for r in reqs)


def test_sharegpt_uses_first_human_turn_and_reply_length(tmp_path: Path) -> None:
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "what is a cat"},
                                      {"from": "gpt", "value": "a small animal that likes naps"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "no human first"},
                                      {"from": "human", "value": "skipped"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "hi"},  # too short: filtered
                                      {"from": "gpt", "value": "hello there my good friend"}]},
        {"id": "d", "messages": [{"role": "user", "content": "tell me about the sea"},
                                 {"role": "assistant", "content": "it is big and wet and blue"}]},
        "not a conversation",
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    cfg = DatasetConfig(dataset="sharegpt", dataset_path=str(path), num_prompts=10)
    reqs = build_dataset(cfg, None, seed=0)
    assert sorted((r.prompt, r.max_tokens) for r in reqs) == [
        ("tell me about the sea", 7), ("what is a cat", 6)]
    fixed = build_dataset(DatasetConfig(dataset="sharegpt", dataset_path=str(path),
                                        output_len="5"), None, 0)
    assert {r.max_tokens for r in fixed} == {5}


def test_sharegpt_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --dataset-path"):
        DatasetConfig(dataset="sharegpt")
    with pytest.raises(ValueError, match="cannot read"):
        build_dataset(DatasetConfig(dataset="sharegpt",
                                    dataset_path=str(tmp_path / "nope.json")), None, 0)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no usable conversation"):
        build_dataset(DatasetConfig(dataset="sharegpt",
                                    dataset_path=str(tmp_path / "empty.json")), None, 0)


def test_dataset_config_validates() -> None:
    with pytest.raises(ValueError, match="--dataset"):
        DatasetConfig(dataset="random")
    with pytest.raises(ValueError, match="bad length"):
        DatasetConfig(input_len="uniform:5")
    with pytest.raises(ValueError, match="num-prompts"):
        DatasetConfig(num_prompts=0)
