"""Guided decoding in the engine on SmolLM2 (fp32): outputs match their grammar under greedy and
seeded sampling, in a batch beside unguided rows, and a matcher rebuilt from the output so far
(what a decode worker does after the prefill worker sampled the first token) continues exactly
as the engine that sampled every token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import jsonschema
import pytest
import torch

from engine.grammar_runtime import apply_bitmask
from engine.guided import GuidedDecoding, GuidedKind, grammar_error
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
PROMPT = "Describe a person as JSON:"


@pytest.fixture(scope="module")
def engine(smollm2_engine: Callable[..., LLMEngine]) -> LLMEngine:
    return smollm2_engine(dtype="float32", kv_cache_memory="64MiB", max_model_len=512)


def _guided(kind: GuidedKind, spec: str = "", **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 160), temperature=kw.pop("t", 0.0),
                          guided=GuidedDecoding(kind, spec), **kw)  # type: ignore[arg-type]


def _text(engine: LLMEngine, seq: object) -> str:
    return engine.tokenizer.decode(seq.output_ids)  # type: ignore[attr-defined]


def test_json_schema_greedy_and_seeded_beside_unguided(engine: LLMEngine) -> None:
    prompt = engine.tokenizer.encode(PROMPT)
    params = [_guided(GuidedKind.JSON_SCHEMA, json.dumps(SCHEMA)),
              SamplingParams(max_tokens=20, temperature=0.0),
              _guided(GuidedKind.JSON_SCHEMA, json.dumps(SCHEMA), t=1.0, seed=7),
              _guided(GuidedKind.JSON_OBJECT)]
    bob = engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{
        "role": "user", "content": "Return a JSON object with the keys name and age for a "
        "person called Bob who is 30."}]))
    seqs = engine.generate([prompt] * 3 + [bob], params)
    for i in (0, 2):
        jsonschema.validate(json.loads(_text(engine, seqs[i])), SCHEMA)
        assert seqs[i].finish_reason.value == "stop"
    assert json.loads(_text(engine, seqs[3])) == {"name": "Bob", "age": 30}
    alone = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0))[0]
    assert seqs[1].output_ids == alone.output_ids  # the unguided row is untouched
    engine.check_idle_integrity()


def test_regex_and_choice(engine: LLMEngine) -> None:
    prompt = engine.tokenizer.encode("The date today is")
    seqs = engine.generate([prompt, prompt], [
        _guided(GuidedKind.REGEX, r"\d{4}-\d{2}-\d{2}"),
        _guided(GuidedKind.CHOICE, json.dumps(["yes", "no", "maybe"]), t=1.0, seed=1)])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", _text(engine, seqs[0]))
    assert _text(engine, seqs[1]) in ("yes", "no", "maybe")


def test_matcher_rebuilt_from_output_so_far_allows_the_same_tokens(engine: LLMEngine) -> None:
    """A decode worker adopts prompt + first token and rebuilds its matcher from the compiled
    grammar and the output so far: at every position the original next token is allowed."""
    prompt = engine.tokenizer.encode(PROMPT)
    params = _guided(GuidedKind.JSON_SCHEMA, json.dumps(SCHEMA))
    full = engine.generate([prompt], params)[0].output_ids
    first = engine.generate([prompt], SamplingParams(
        max_tokens=1, temperature=0.0, guided=params.guided))[0].output_ids
    assert first == full[:1]
    runtime = engine.runner.grammars
    assert runtime is not None
    for k in range(1, len(full)):
        seq = Sequence("s", prompt + full[:k], params, num_prompt_tokens=len(prompt))
        mask = runtime.bitmask([seq])  # a fresh sequence: rebuilt, then advanced by k tokens
        assert mask is not None
        logits = torch.zeros(1, engine.model_config.vocab_size)
        allowed = apply_bitmask(logits, mask)[0].isfinite()
        assert allowed[full[k]], f"token {k} of the original run is not allowed after rebuild"
        assert int(allowed.sum()) < allowed.numel()  # the mask constrains


def test_grammar_error_names_the_problem() -> None:
    assert grammar_error(GuidedDecoding(GuidedKind.JSON_SCHEMA, json.dumps(SCHEMA))) is None
    assert "objectx" in (grammar_error(GuidedDecoding(GuidedKind.JSON_SCHEMA,
                                                      '{"type": "objectx"}')) or "")
    assert grammar_error(GuidedDecoding(GuidedKind.JSON_SCHEMA, "{not json")) is not None
    assert "regex" in (grammar_error(GuidedDecoding(GuidedKind.REGEX, "a(b")) or "")
    assert grammar_error(GuidedDecoding(GuidedKind.CHOICE, "[]")) is not None
