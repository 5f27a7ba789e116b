"""Workloads: the requests a benchmark sends, built reproducibly from a seed.

Three datasets, all returning `BenchRequest`s (chat messages plus the flat prompt the
completions endpoint gets):
- `synthetic`: one user message per request; input and output lengths drawn from `LengthDist`s.
- `multiturn`: synthetic chats. Every conversation starts with the same system prompt and each
  turn resends the whole history, so turn k shares its prefix with turn k-1 (prefix reuse). The
  assistant turns of the history are synthetic text of the turn's output length, not the
  server's answers, so requests stay independent and the workload reproducible. Requests are
  ordered turn by turn (all first turns, then all second turns, ...), as users who read answers.
- `sharegpt`: a ShareGPT-format JSON file (`[{"conversations": [{"from": "human", "value": ..},
  {"from": "gpt", "value": ..}, ..]}, ..]`): the first human turn is the prompt and the reply's
  length (in tokens) the output length, as vLLM's benchmark does.

Prompt sizes are in tokens of a tokenizer (`load_tokenizer`) when one is available; without
one, one common English word counts as one token (true to within a few % for GPT-2-style BPE
vocabularies, the word list below being chosen so).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# Frequent English words, each one token (with its leading space) in GPT-2-style vocabularies.
_WORD_TEXT = """the of and to a in is it you that he was for on are with as his they be at one
have this from or had by word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so these
her long make thing see him two has look more day could go come did number sound no most people
my over know water than call first who may down side been now find any new work part take get
place made live where after back little only round man year came show every good me give our
under name very through just form great think say help low line turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food
sun four thought let keep eye never last door between city tree cross since hard start might
story saw far sea draw left late run while press close night real life few stop"""
WORDS = tuple(_WORD_TEXT.split())
DATASETS = ("synthetic", "multiturn", "sharegpt")
DEFAULT_OUTPUT_LEN = "64"


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload. `messages` is what the chat endpoint sends, `prompt` what the
    completions endpoint sends; `num_prompt_tokens` is as counted here (the server's usage has
    the real number, chat template included)."""

    messages: tuple[dict[str, str], ...]
    prompt: str
    num_prompt_tokens: int
    max_tokens: int
    conversation: int | None = None
    turn: int | None = None


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution, parsed from `N`, `uniform:LO:HI`, `normal:MEAN:STD` or
    `exp:MEAN`; samples are integers clipped to [1, cap]."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str | int) -> LengthDist:
        kind, *rest = str(spec).strip().lower().split(":")
        if not rest:
            kind, rest = "fixed", [kind]
        try:
            nums = [float(x) for x in rest]
        except ValueError:
            nums = []
        arity = {"fixed": 1, "uniform": 2, "normal": 2, "exp": 1}.get(kind)
        if (len(nums) != arity or not all(math.isfinite(n) and n >= 0 for n in nums)
                or (kind != "normal" and min(nums) < 1)
                or (kind == "uniform" and nums[0] > nums[1])):
            raise ValueError(f"bad length {spec!r}: use N, uniform:LO:HI (1 <= LO <= HI), "
                             "normal:MEAN:STD or exp:MEAN (token counts >= 1)")
        return cls(kind, *nums)

    def sample(self, rng: np.random.Generator, n: int, cap: int = 1 << 20) -> np.ndarray:
        if self.kind == "fixed":
            x = np.full(n, self.a)
        elif self.kind == "uniform":
            x = rng.integers(int(self.a), int(self.b) + 1, size=n)
        elif self.kind == "normal":
            x = rng.normal(self.a, self.b, size=n)
        else:
            x = rng.exponential(self.a, size=n)
        return np.clip(np.rint(x), 1, cap).astype(np.int64)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.a:g}"
        return f"{self.kind}:{self.a:g}" + (f":{self.b:g}" if self.kind != "exp" else "")


@dataclass(frozen=True)
class DatasetConfig:
    """What to send. Lengths are token counts (see `LengthDist` for the syntax)."""

    dataset: str = field(default="synthetic", metadata={
        "help": "synthetic, multiturn or sharegpt."})
    dataset_path: str | None = field(default=None, metadata={
        "help": "ShareGPT-format JSON file (--dataset sharegpt)."})
    num_prompts: int = field(default=100, metadata={"help": "Number of requests to send."})
    input_len: str = field(default="256", metadata={
        "help": "Prompt (multiturn: user turn) length in tokens: N, uniform:LO:HI, "
                "normal:MEAN:STD or exp:MEAN."})
    output_len: str | None = field(default=None, metadata={
        "help": "Output length in tokens (max_tokens), same syntax "
                "(default: 64; sharegpt: each reply's length)."})
    num_turns: int = field(default=4, metadata={"help": "Turns per conversation (multiturn)."})
    system_prompt_len: int = field(default=64, metadata={
        "help": "Tokens of the system prompt every conversation shares (multiturn; 0 = none)."})
    max_prompt_len: int = field(default=1024, metadata={
        "help": "Skip sharegpt prompts longer than this (tokens)."})

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, "
                             f"got {self.dataset!r}")
        if self.dataset == "sharegpt" and not self.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE.json")
        if self.num_prompts < 1 or self.num_turns < 1 or self.system_prompt_len < 0:
            raise ValueError("--num-prompts and --num-turns must be >= 1, --system-prompt-len >= 0")
        LengthDist.parse(self.input_len)
        LengthDist.parse(self.output_dist_spec)

    @property
    def output_dist_spec(self) -> str:
        return self.output_len or DEFAULT_OUTPUT_LEN


class TextSizer:
    """Random text of a given token count (exact with a tokenizer, ~1 word/token without)."""

    def __init__(self, tokenizer: TextTokenizer | None) -> None:
        self.tokenizer = tokenizer

    def text(self, rng: np.random.Generator, num_tokens: int) -> tuple[str, int]:
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=num_tokens)]
        if self.tokenizer is None:
            return " ".join(words), num_tokens
        text = " ".join(words)
        ids = self.tokenizer.encode(text)
        while len(ids) < num_tokens:  # a word may be one token less than assumed; never more
            text += " " + WORDS[int(rng.integers(0, len(WORDS)))]
            ids = self.tokenizer.encode(text)
        text = self.tokenizer.decode(ids[:num_tokens])
        return text, len(self.tokenizer.encode(text))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text)) if self.tokenizer else len(text.split())


def flatten(messages: tuple[dict[str, str], ...]) -> str:
    """The completions-endpoint prompt of a conversation: one `role: text` line per message."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"


def synthetic(cfg: DatasetConfig, sizer: TextSizer, rng: np.random.Generator) -> list[BenchRequest]:
    inputs = LengthDist.parse(cfg.input_len).sample(rng, cfg.num_prompts)
    outputs = LengthDist.parse(cfg.output_dist_spec).sample(rng, cfg.num_prompts)
    out = []
    for n_in, n_out in zip(inputs, outputs, strict=True):
        text, n = sizer.text(rng, int(n_in))
        out.append(BenchRequest(({"role": "user", "content": text},), text, n, int(n_out)))
    return out


def multiturn(cfg: DatasetConfig, sizer: TextSizer, rng: np.random.Generator) -> list[BenchRequest]:
    num_conversations = -(-cfg.num_prompts // cfg.num_turns)
    system, n_system = sizer.text(rng, cfg.system_prompt_len) if cfg.system_prompt_len else ("", 0)
    user_len, reply_len = LengthDist.parse(cfg.input_len), LengthDist.parse(cfg.output_dist_spec)
    by_turn: list[list[BenchRequest]] = [[] for _ in range(cfg.num_turns)]
    for conv in range(num_conversations):
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        num_tokens = n_system
        for turn, n_user, n_reply in zip(range(cfg.num_turns), user_len.sample(rng, cfg.num_turns),
                                         reply_len.sample(rng, cfg.num_turns), strict=True):
            text, n = sizer.text(rng, int(n_user))
            history.append({"role": "user", "content": text})
            num_tokens += n
            messages = tuple(dict(m) for m in history)
            by_turn[turn].append(BenchRequest(messages, flatten(messages), num_tokens, int(n_reply),
                                              conv, turn))
            reply, n = sizer.text(rng, int(n_reply))
            history.append({"role": "assistant", "content": reply})
            num_tokens += n
    return [r for turn in by_turn for r in turn][: cfg.num_prompts]


def _sharegpt_pairs(data: Any) -> list[tuple[str, str]]:
    """(first human turn, the reply to it) of each conversation that has both."""
    pairs = []
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict):
            continue
        turns = item.get("conversations") or item.get("messages") or []
        texts = [(t.get("from") or t.get("role"), t.get("value") or t.get("content"))
                 for t in turns if isinstance(t, dict)]
        if (len(texts) >= 2 and texts[0][0] in ("human", "user")
                and texts[1][0] in ("gpt", "assistant")
                and isinstance(texts[0][1], str) and isinstance(texts[1][1], str)):
            pairs.append((texts[0][1], texts[1][1]))
    return pairs


def sharegpt(cfg: DatasetConfig, sizer: TextSizer, rng: np.random.Generator) -> list[BenchRequest]:
    path = Path(cfg.dataset_path or "")
    try:
        pairs = _sharegpt_pairs(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read ShareGPT file {path}: {e}") from None
    out_lens = LengthDist.parse(cfg.output_dist_spec).sample(rng, len(pairs))
    out = []
    for i in rng.permutation(len(pairs)):
        prompt, reply = pairs[i]
        n_in = sizer.count(prompt)
        n_out = int(out_lens[i]) if cfg.output_len else sizer.count(reply)
        if n_in < 4 or n_out < 4 or n_in > cfg.max_prompt_len:  # vLLM's filter
            continue
        out.append(BenchRequest(({"role": "user", "content": prompt},), prompt, n_in, n_out))
        if len(out) == cfg.num_prompts:
            break
    if not out:
        raise ValueError(f"{path}: no usable conversation (a human turn of 4..{cfg.max_prompt_len} "
                         "tokens followed by a reply of >= 4 tokens)")
    return out


def build_dataset(cfg: DatasetConfig, tokenizer: TextTokenizer | None,
                  seed: int) -> list[BenchRequest]:
    """The requests of `cfg`; the same seed and tokenizer give the same requests."""
    rng, sizer = np.random.default_rng(seed), TextSizer(tokenizer)
    if cfg.dataset == "multiturn":
        return multiturn(cfg, sizer, rng)
    if cfg.dataset == "sharegpt":
        return sharegpt(cfg, sizer, rng)
    return synthetic(cfg, sizer, rng)


class _JsonTokenizer:
    """A `tokenizers` tokenizer.json, adapted to encode -> list[int] without special tokens."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)


def load_tokenizer(spec: str) -> TextTokenizer:
    """A tokenizer from a tokenizer.json file, or anything pdserve's --model takes ('smollm2',
    a .gguf file, an HF directory). Raises ValueError when none can be built from `spec`."""
    if spec.endswith(".json") and Path(spec).is_file():
        return _JsonTokenizer(spec)
    try:
        from engine.checkpoint import resolve_model_path
        from engine.tokenizer import Tokenizer

        path = resolve_model_path(spec)
        return Tokenizer.from_gguf(path) if path.is_file() else Tokenizer.from_hf_dir(path)
    except Exception as e:  # any failure means: no tokenizer from this spec
        raise ValueError(f"no tokenizer from {spec!r}: {e}") from None
