"""A heterogeneous pair: prefill with the Ampere profile (bf16, flash NHD) and decode with the
Volta profile (fp16, paged-attention-v1 layout). The KV is converted on arrival (bf16 -> fp16,
NHD -> paged-v1 with its x split).

Tolerance (documented in the README): the prefill side rounds K/V to bf16 (8 mantissa bits)
where the reference keeps fp32, so a near-tie between two tokens can flip late in a generation.
We require every prompt's first 8 greedy tokens to match the fp32 colocated reference exactly
and the whole 24-token texts to match for at least 2 of the 3 prompts.
"""

from __future__ import annotations

from serving import NO_WARMUP, serve

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPTS = ["The three primary colors are", "Water boils at", "def add(a, b):\n    return"]


def test_ampere_prefill_to_volta_decode_matches_reference(smollm2_reference: LLMEngine) -> None:
    ref = smollm2_reference
    tok = ref.tokenizer
    with serve("--prefill-profile", "ampere", "--decode-profile", "volta",
               "--placement", "remote", *NO_WARMUP) as server, server.client() as c:
        status = {w["role"]: w["kv_plan"] for w in c.get("/status").json()["workers"]}
        assert "bfloat16" in status["prefill"] and "NHD" in status["prefill"]
        assert "float16" in status["decode"] and "paged_v1" in status["decode"]
        exact = 0
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            want = ref.generate([ids], SamplingParams(max_tokens=24, temperature=0.0,
                                                      ignore_eos=True))[0]
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24,
                                                "temperature": 0, "ignore_eos": True,
                                                "logprobs": 0})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            want_tokens = [tok.decode([t], skip_special_tokens=False) for t in want.output_ids]
            assert choice["logprobs"]["tokens"][:8] == want_tokens[:8]
            exact += choice["text"] == tok.decode(want.output_ids)
        assert exact >= 2
        assert server.wait_idle_blocks() == 0
