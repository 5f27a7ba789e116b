"""Why chunked prefill with cached context is slow on CUDA (issue 15's profile: 57-83 ms per
step on an H100 whatever the chunk size, 12-16 ms without context): time the attention a
later chunk runs (engine/attention.py `_prefill_one`: gather the context, a boolean mask, SDPA)
for new (query, context) shapes, each twice (the first call of a shape may build a plan), under
each SDPA backend torch offers, at the Llama-3-8B shape (32 query heads, 8 KV heads, dim 128).

    python -m bench.sdpa_probe [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [(256, 512), (256, 768), (256, 1024), (64, 960), (64, 1024), (512, 2560), (1024, 4096)]
BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attend(q_len: int, ctx: int, heads: int = 32, kv_heads: int = 8, dim: int = 128) -> float:
    """One layer's masked attention of a `q_len`-token chunk over `ctx` tokens: ms."""
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, heads, q_len, dim, device=dev, dtype=dt)
    k = torch.randn(1, kv_heads, ctx, dim, device=dev, dtype=dt)
    k = k.unsqueeze(2).expand(1, kv_heads, heads // kv_heads, ctx, dim).reshape(1, heads, ctx, dim)
    v = k.clone()
    q_pos = torch.arange(ctx - q_len, ctx, device=dev).unsqueeze(1)
    mask = (torch.arange(ctx, device=dev).unsqueeze(0) <= q_pos)[None, None]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sdpa_probe", description=__doc__)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    attend(16, 64)  # CUDA context, cuBLAS
    rows: list[dict[str, Any]] = []
    for name, backend in BACKENDS.items():
        for q_len, ctx in SHAPES:
            try:
                if backend is None:
                    times = [attend(q_len, ctx) for _ in range(3)]
                else:
                    with sdpa_kernel([backend]):
                        times = [attend(q_len, ctx) for _ in range(3)]
            except RuntimeError as e:
                rows.append({"backend": name, "q_len": q_len, "ctx": ctx, "error": str(e)[:120]})
                continue
            rows.append({"backend": name, "q_len": q_len, "ctx": ctx,
                         "first_ms": round(times[0], 3), "then_ms": round(min(times[1:]), 3)})
        print(name, [(r["q_len"], r["ctx"], r.get("first_ms"), r.get("then_ms"))
                     for r in rows if r["backend"] == name], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
