"""Fidelity: our greedy tokens equal Hugging Face transformers' on SmolLM2 (same GGUF, fp32).

Both sides load `SmolLM2-135M-Instruct.Q4_1.gguf` dequantized to float32. Ours runs every prompt
as one continuous batch with a small token budget, so long prompts are prefilled in chunks next
to other sequences' decode steps; transformers runs each prompt alone with `generate`. Both
ignore EOS, so all 32 tokens are compared. On a mismatch the failure message gives the first
differing position and transformers' logit gap there (a near-tie explains a flip; a wide gap
is a bug).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

NUM_NEW_TOKENS = 32

_HISTORY = (
    "The Industrial Revolution began in Great Britain in the second half of the eighteenth "
    "century and spread to continental Europe and North America over the following decades. "
    "Mechanised spinning and weaving transformed the textile industry, while improvements to the "
    "steam engine by James Watt made it practical to power factories far from rivers. Coal "
    "production rose sharply, canals and later railways connected mines, ports and growing "
    "cities, and iron became cheap enough to build bridges, ships and machines. Working "
    "conditions in the new mills were often harsh: children worked long shifts, wages were low, "
    "and housing in industrial towns was crowded and unsanitary. Reformers campaigned for "
    "factory acts that limited working hours, and trade unions slowly gained legal recognition. "
)
_SCIENCE = (
    "Photosynthesis is the process by which green plants, algae and some bacteria convert light "
    "energy into chemical energy. In the light-dependent reactions, chlorophyll absorbs photons "
    "and uses their energy to split water molecules, releasing oxygen and producing ATP and "
    "NADPH. In the Calvin cycle, enzymes such as RuBisCO fix carbon dioxide from the air into "
    "three-carbon sugars, which the plant then uses to build glucose, starch and cellulose. "
    "Because nearly all food chains start with photosynthetic organisms, the process sustains "
    "most life on Earth and keeps the oxygen content of the atmosphere stable. "
)
_CODE = '''import heapq


def dijkstra(graph, source):
    """Shortest distances from source in a graph given as {node: [(neighbour, weight)]}."""
    dist = {source: 0}
    queue = [(0, source)]
    while queue:
        d, node = heapq.heappop(queue)
        if d > dist.get(node, float("inf")):
            continue
        for neighbour, weight in graph.get(node, []):
            nd = d + weight
            if nd < dist.get(neighbour, float("inf")):
                dist[neighbour] = nd
                heapq.heappush(queue, (nd, neighbour))
    return dist


def'''


@dataclass(frozen=True)
class Case:
    name: str
    text: str | None = None  # raw prompt
    messages: tuple[dict[str, str], ...] | None = None  # chat-templated prompt
    min_tokens: int = 1


CASES = [
    Case("raw_short", text="The capital of France is"),
    Case("raw_numbers", text="1, 1, 2, 3, 5, 8, 13,"),
    Case("chat_short", messages=({"role": "user", "content": "What is the capital of Japan?"},)),
    Case("chat_system", messages=(
        {"role": "system", "content": "You are a concise assistant that answers in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"})),
    Case("chat_multi_turn", messages=(
        {"role": "user", "content": "Give me a name for a grey cat."},
        {"role": "assistant", "content": "How about Smokey?"},
        {"role": "user", "content": "Something more unusual, please."})),
    Case("raw_long", text=_HISTORY + _SCIENCE + _HISTORY.replace("Great Britain", "Belgium")
         + "In summary, the most important consequence of these changes was", min_tokens=300),
    Case("chat_long", messages=({"role": "user", "content": "Summarize the following text in "
                                 "two sentences.\n\n" + _SCIENCE + _HISTORY + _SCIENCE},),
         min_tokens=300),
    Case("raw_multilingual", text="Bonjour, je m'appelle Marie et j'habite à Paris. "
         "Hallo, ich heiße Jonas und wohne in Berlin. Hola, me llamo"),
    Case("chat_multilingual", messages=(
        {"role": "user", "content": "Traduis en anglais : « Le chat dort sur le canapé. »"},)),
    Case("raw_chinese", text="北京是中国的首都，也是一座历史悠久的城市。上海是"),
    Case("raw_code", text=_CODE),
    Case("chat_code", messages=(
        {"role": "user", "content": "Write a Python function that checks if a string is a "
                                    "palindrome."},)),
]


def _prompt_ids(tokenizer: Any, case: Case) -> list[int]:
    if case.messages is not None:
        return tokenizer.encode(tokenizer.apply_chat_template(list(case.messages)))
    assert case.text is not None
    return tokenizer.encode(case.text)


@pytest.fixture(scope="module")
def engine(smollm2_engine: Callable[..., LLMEngine]) -> LLMEngine:
    # A 256-token step budget chunks the long prompts and mixes them with decode steps.
    return smollm2_engine(dtype="float32", kv_cache_memory="128MiB", max_model_len=1024,
                          max_num_batched_tokens=256, block_size=16)


@pytest.fixture(scope="module")
def hf_model(hf_smollm2_model: Any) -> Any:
    # No EOS: transformers would stop there and pad; we compare all 32 tokens. (A copy of the
    # session's model, so changing its generation config affects no other test.)
    model = copy.deepcopy(hf_smollm2_model)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def prompts(engine: LLMEngine) -> dict[str, list[int]]:
    return {case.name: _prompt_ids(engine.tokenizer, case) for case in CASES}


@pytest.fixture(scope="module")
def ours(engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """All prompts as one continuous batch, greedy, EOS ignored."""
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(list(prompts.values()), params)
    engine.check_idle_integrity()
    return {name: seq.output_ids for name, seq in zip(prompts, seqs, strict=True)}


def _hf_greedy(hf_model: Any, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=NUM_NEW_TOKENS)
    return out[0, len(prompt):].tolist()


def _logit_gap(hf_model: Any, context: list[int], ours_token: int, ref_token: int) -> str:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([context])).logits[0, -1].float()
    top2 = torch.topk(logits, 2)
    return (f"transformers logits there: ref token {ref_token} = {logits[ref_token]:.5f}, "
            f"our token {ours_token} = {logits[ours_token]:.5f} "
            f"(gap {logits[ref_token] - logits[ours_token]:.2e}; top-2 {top2.indices.tolist()} "
            f"{[round(v, 5) for v in top2.values.tolist()]})")


def test_prompt_set_is_varied(prompts: dict[str, list[int]]) -> None:
    for case in CASES:
        assert len(prompts[case.name]) >= case.min_tokens, (case.name, len(prompts[case.name]))
    assert sum(c.messages is not None for c in CASES) >= 4
    assert sum(len(p) > 300 for p in prompts.values()) >= 2


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_greedy_tokens_match_transformers(case: Case, prompts: dict[str, list[int]],
                                          ours: dict[str, list[int]], hf_model: Any) -> None:
    prompt = prompts[case.name]
    ref = _hf_greedy(hf_model, prompt)
    got = ours[case.name]
    assert len(ref) == NUM_NEW_TOKENS
    if got == ref:
        return
    pos = next(i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b)
    gap = _logit_gap(hf_model, prompt + ref[:pos], got[pos], ref[pos])
    pytest.fail(f"{case.name} ({len(prompt)} prompt tokens): first difference at new token {pos}: "
                f"ours {got[pos]} vs transformers {ref[pos]}; {gap}\nours: {got}\nref:  {ref}")
