"""A small, hand-written device profile for the planner's tests (numbers chosen to be easy to
check by hand: a prefill costs 1 ms per token, a decode step 20 ms at batch 1)."""

from __future__ import annotations

from engine.kv_spec import KvDtype, KvSpec
from planner.profile import EngineLimits, Profile
from protocol import worker_events as ev

KV_BYTES = 1000.0  # per token
GBPS_BYTES = 1e9  # the stream transfer: 1 GB/s


def small_profile(max_num_batched_tokens: int = 2048, capacity: int = 100_000,
                  max_num_seqs: int = 64) -> Profile:
    return Profile(
        EngineLimits(max_num_batched_tokens, max_num_seqs, 16, capacity, 4096), KV_BYTES,
        prefill=[[16, 0.016], [256, 0.256], [1024, 1.024], [2048, 2.048]],
        decode=[[1, 128, 0.02], [1, 4096, 0.02], [8, 128, 0.03], [8, 4096, 0.05],
                [64, 128, 0.08], [64, 4096, 0.2]],
        chunked=[], mixed=[[8, 512, 256, 0.276]],
        transfers={"stream": [[1e6, 1e6 / GBPS_BYTES], [1e9, 1.0]],
                   "nccl": "not measured: needs 2 CUDA devices"},
        meta={"device": "test fixture", "engine_args": ["--max-model-len", "2048"]})


def worker_hello(worker_id: str, role: str) -> ev.Hello:
    """A worker's Hello as the placer registers it (small bf16 KV, 2048-token budget)."""
    return ev.Hello(worker_id, role, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2",
                    KvSpec(2, 2, 64, 16, dtype=KvDtype.BFLOAT16), "plan", 1, "localhost", "m",
                    2048)
