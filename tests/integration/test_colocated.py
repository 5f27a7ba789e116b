"""`pdserve serve --colocated` (decode workers prefill locally, the benchmark baseline) with
`--api-key`: auth is enforced on /v1/*, and the output equals the in-process engine's. The
deployment (serving.GUARDED) is shared with tests/security/test_http_limits.py
(tests/conftest.py, `shared_deployment`)."""

from __future__ import annotations

from collections.abc import Callable

from serving import API_KEY, GUARDED, Server

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def test_colocated_with_api_key(smollm2_reference: LLMEngine,
                                shared_deployment: Callable[..., Server]) -> None:
    ref = smollm2_reference
    prompt = "The capital of Italy is"
    want = ref.generate([ref.tokenizer.encode(prompt)],
                        SamplingParams(max_tokens=16, temperature=0.0))[0]
    server = shared_deployment(*GUARDED)
    with server.client() as c:
        assert c.get("/health").json()["prefill_workers"] == 0
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"]
        r = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref.tokenizer.decode(want.output_ids)
        assert c.get("/health").status_code == 200  # not under /v1: no key needed
        assert server.metric("pdserve:kv_transfer_bytes_total") == 0
