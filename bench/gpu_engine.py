"""GPU engine benchmark: a Llama-3-8B-shaped model (random bf16 weights) on one GPU.

Measured side by side in one run, on the same card:
- the card's ceilings: device-to-device copy bandwidth (one 2 GiB copy, bytes read + written)
  and the bf16 matrix rate (8192^3 product on random data);
- decode step time at batch 1, 16, 64 with 1024 tokens of context each, through
  `ModelRunner.execute` (input upload, CUDA-graph replay, sampling, the read-back of the
  tokens), against the memory-bandwidth floor: (weight bytes + KV bytes read per step) /
  copy bandwidth. Also the graph replay alone (GPU time) and the eager step (no graphs);
- prefill throughput of one 4096-token prompt against the matrix rate (FLOPs counted: 2 per
  weight per token for every linear layer, plus causal attention);
- the Triton decode-attention kernel alone per layer, against the KV bytes it must read.

Every timing is the median of repeated runs after warm-up (CUDA events or a synchronised
host clock). Results: bench/results/gpu_engine.json and .md (or --out-dir).
Run from the repository root: `python -m bench.gpu_engine`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.kv_spec import KvDtype, KvLayout, KvSpec
from engine.memory_plan import KvPlan
from engine.model_runner import ModelRunner, ScheduledSeq
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

LLAMA3_8B = ModelConfig(
    "llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192, name="llama-3-8b-shaped (random bf16)")
CONTEXT = 1024
PREFILL_TOKENS = 4096
DECODE_BATCHES = (1, 16, 64)
BLOCK_SIZE = 16
RESULTS = Path(__file__).parent / "results"


def time_cuda(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median seconds of fn() on the GPU (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_host(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median wall seconds of fn(), which must end waiting for the GPU itself."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (2 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src), warmup=3, repeats=20)
    return 2 * (2 << 30) / seconds


def matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n^3 bf16 matrix product on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    seconds = time_cuda(lambda: a @ b, warmup=3, repeats=10)
    return 2 * n ** 3 / seconds


def build_runner(max_num_seqs: int, max_model_len: int, num_blocks: int) -> ModelRunner:
    spec = KvSpec(num_layers=LLAMA3_8B.num_layers, num_kv_heads=LLAMA3_8B.num_kv_heads,
                  head_dim=LLAMA3_8B.head_dim, block_size=BLOCK_SIZE, dtype=KvDtype.BFLOAT16,
                  layout=KvLayout.NHD)
    plan = KvPlan(spec, num_blocks, max_model_len, max_num_seqs, "bench")
    # no weights: the runner draws random ones on the device (--load-format dummy)
    runner = ModelRunner(LLAMA3_8B, {}, plan, torch.bfloat16, torch.device("cuda"))
    for layer in runner.kv_caches:  # never time on zeros
        for t in layer:
            t.normal_()
    return runner


def make_batch(num_seqs: int, context: int, new_tokens: int,
               first_block: int) -> list[ScheduledSeq]:
    """`num_seqs` sequences with `context` tokens of which the last `new_tokens` are computed
    this step (1 = a decode step), each on its own blocks from `first_block` on."""
    gen = torch.Generator().manual_seed(num_seqs)
    batch, block = [], first_block
    for i in range(num_seqs):
        seq = Sequence(f"bench-{num_seqs}-{i}",
                       torch.randint(0, LLAMA3_8B.vocab_size, (context,), generator=gen).tolist(),
                       SamplingParams(temperature=0.0))
        num_blocks = -(-context // BLOCK_SIZE)
        seq.block_table = list(range(block, block + num_blocks))
        block += num_blocks
        seq.num_computed_tokens = context - new_tokens
        batch.append(ScheduledSeq(seq, new_tokens))
    return batch


def bench_decode(runner: ModelRunner, num_seqs: int, copy_bw: float) -> dict[str, Any]:
    batch = make_batch(num_seqs, CONTEXT, 1, first_block=0)
    step = lambda: runner.execute(batch)  # noqa: E731
    step_s = time_host(step, warmup=5, repeats=30)
    runner._graph_logits(batch)  # fill the static inputs once, then time the replay alone
    graph = runner.graphs.graphs[runner.graphs.padded_size(num_seqs)][0]
    replay_s = time_cuda(graph.replay, warmup=3, repeats=30)
    runner.use_cuda_graphs = False
    eager_s = time_host(step, warmup=2, repeats=10)
    runner.use_cuda_graphs = True
    cfg = LLAMA3_8B
    weight_bytes = (cfg.num_params - cfg.vocab_size * cfg.hidden_size) * 2  # embedding: B rows only
    kv_bytes = num_seqs * CONTEXT * runner.plan.spec.bytes_per_token
    floor_s = (weight_bytes + kv_bytes) / copy_bw
    return {"batch": num_seqs, "context": CONTEXT, "step_ms": step_s * 1e3,
            "graph_replay_ms": replay_s * 1e3, "eager_step_ms": eager_s * 1e3,
            "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "floor_ms": floor_s * 1e3,
            "step_over_floor": step_s / floor_s, "replay_over_floor": replay_s / floor_s,
            "tokens_per_s": num_seqs / step_s}


def prefill_flops(cfg: ModelConfig, tokens: int) -> float:
    linear = (cfg.num_params - 2 * cfg.vocab_size * cfg.hidden_size
              - cfg.num_layers * 2 * cfg.hidden_size)
    # causal QK^T + PV
    attention = cfg.num_layers * 2 * cfg.num_heads * cfg.head_dim * tokens * tokens
    # + one row of logits
    return 2 * linear * tokens + attention + 2 * cfg.vocab_size * cfg.hidden_size


def bench_prefill(runner: ModelRunner, matmul: float, first_block: int) -> dict[str, Any]:
    batch = make_batch(1, PREFILL_TOKENS, PREFILL_TOKENS, first_block)
    seconds = time_host(lambda: runner.execute(batch), warmup=2, repeats=7)
    flops = prefill_flops(LLAMA3_8B, PREFILL_TOKENS)
    return {"tokens": PREFILL_TOKENS, "ms": seconds * 1e3, "tokens_per_s": PREFILL_TOKENS / seconds,
            "flops": flops, "tflops": flops / seconds / 1e12,
            "over_matmul_rate": flops / seconds / matmul}


def time_graph(fn: Callable[[int], Any], num_inner: int = 10) -> float:
    """Median GPU seconds of one fn(i) call, from a CUDA graph of fn(0) ... fn(num_inner - 1)
    (no launch gaps; fn(i) should touch different memory for each i, so the L2 cache does
    not serve repeats)."""
    for i in range(num_inner):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(num_inner):
            fn(i)
    return time_cuda(graph.replay, warmup=3, repeats=20) / num_inner


KERNEL_CONFIGS = ((64, 4, 2), (64, 4, 3), (32, 4, 3), (128, 4, 2), (64, 8, 2))
"""(block_n, num_warps, num_stages) of the decode-attention kernel; the first is the default."""


def bench_attention_kernel(runner: ModelRunner, copy_bw: float) -> list[dict[str, Any]]:
    """decode_attention alone (layer i's cache for the i-th of 10 launches in a graph), over
    split counts and launch configurations, against the KV bytes it must read."""
    from engine.triton_attention import choose_num_splits, decode_attention

    cfg, rows = LLAMA3_8B, []
    caches = [(layer[0][0], layer[0][1]) for layer in runner.kv_caches[:10]]
    for num_seqs in DECODE_BATCHES:
        batch = make_batch(num_seqs, CONTEXT, 1, first_block=0)
        tables = torch.tensor([s.seq.block_table for s in batch], device="cuda")
        lens = torch.full((num_seqs,), CONTEXT, device="cuda")
        q = torch.randn(num_seqs, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        kv_bytes = num_seqs * CONTEXT * cfg.num_kv_heads * cfg.head_dim * 2 * 2
        chosen = choose_num_splits(num_seqs, cfg.num_kv_heads, CONTEXT, runner.num_sms)
        for block_n, warps, stages in KERNEL_CONFIGS:
            for splits in sorted({1, 2, 4, 8, 16, chosen}):
                def launch(i: int, q: torch.Tensor = q, tables: torch.Tensor = tables,
                           lens: torch.Tensor = lens, splits: int = splits, block_n: int = block_n,
                           warps: int = warps, stages: int = stages) -> None:
                    decode_attention(q, *caches[i], tables, lens, cfg.head_dim ** -0.5, splits,
                                     block_n=block_n, num_warps=warps, num_stages=stages)
                s = time_graph(launch)
                is_default = (splits == chosen
                              and (block_n, warps, stages) == KERNEL_CONFIGS[0])
                rows.append({"batch": num_seqs, "splits": splits, "block_n": block_n,
                             "num_warps": warps, "num_stages": stages, "is_default": is_default,
                             "us": s * 1e6, "kv_bytes": kv_bytes,
                             "over_floor": s / (kv_bytes / copy_bw)})
    return rows


def _kernel_kind(name: str) -> str:
    kinds = (("_decode_kernel", "attention"), ("_merge_kernel", "attention"),
             ("flash", "attention"), ("_add_rms_norm", "add+rmsnorm"),
             ("_rope_write", "rope+kv write"), ("_silu_mul", "silu*mul"), ("gemm", "gemm"),
             ("gemv", "gemm"), ("nvjet", "gemm"), ("cutlass", "gemm"), ("xmma", "gemm"),
             ("splitk", "gemm"))
    low = name.lower()
    return next((kind for key, kind in kinds if key.lower() in low), "other")


def profile_step(runner: ModelRunner, num_seqs: int) -> dict[str, Any]:
    """GPU time by kernel kind in one eager decode step (same kernels as the graph)."""
    from torch.profiler import ProfilerActivity, profile

    batch = make_batch(num_seqs, CONTEXT, 1, first_block=0)
    runner.use_cuda_graphs = False
    runner.execute(batch)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.execute(batch)
    runner.use_cuda_graphs = True
    kinds: dict[str, dict[str, float]] = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
        if us <= 0:
            continue
        kind = kinds.setdefault(_kernel_kind(event.key), {"ms": 0.0, "kernels": 0})
        kind["ms"] += us / 1e3 / 3
        kind["kernels"] += event.count / 3
    return {"batch": num_seqs, "by_kind": kinds,
            "kernel_ms": sum(k["ms"] for k in kinds.values()),
            "kernels": sum(k["kernels"] for k in kinds.values())}


def _kernel_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (batch, launch config): us per layer for each split count."""
    splits = sorted({r["splits"] for r in rows})
    lines = ["| batch | block_n / warps / stages | " + " | ".join(f"{k} splits" for k in splits)
             + " | default (splits: us, x floor) |", "| --- " * (len(splits) + 3) + "|"]
    configs = dict.fromkeys((r["batch"], r["block_n"], r["num_warps"], r["num_stages"])
                            for r in rows)
    for batch, bn, warps, stages in configs:
        mine = {r["splits"]: r for r in rows
                if (r["batch"], r["block_n"], r["num_warps"], r["num_stages"])
                == (batch, bn, warps, stages)}
        default = next((f"{r['splits']}: {r['us']:.1f}, {r['over_floor']:.2f}x"
                        for r in mine.values() if r["is_default"]), "")
        cells = " | ".join(f"{mine[k]['us']:.1f}" if k in mine else "" for k in splits)
        lines.append(f"| {batch} | {bn} / {warps} / {stages} | {cells} | {default} |")
    return lines


def write_results(record: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_engine.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# GPU engine benchmark ({record['date']})", "",
             f"{record['gpu']}, torch {record['torch']}, triton {record['triton']}, "
             f"CUDA {record['cuda']}. Model: {record['model']}, KV cache bf16 NHD, "
             f"block size {BLOCK_SIZE}.", "",
             f"Measured ceilings: copy {record['copy_bw_GBps']:.0f} GB/s (read + write), "
             f"bf16 matmul {record['matmul_tflops']:.0f} TFLOP/s.", "",
             "| decode batch | context | step ms | graph replay ms | eager step ms | floor ms "
             "| step / floor | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in record["decode"]:
        lines.append(f"| {d['batch']} | {d['context']} | {d['step_ms']:.2f} | "
                     f"{d['graph_replay_ms']:.2f} | {d['eager_step_ms']:.2f} | "
                     f"{d['floor_ms']:.2f} | {d['step_over_floor']:.2f}x | "
                     f"{d['tokens_per_s']:.0f} |")
    kinds = sorted({k for prof in record["profile"] for k in prof["by_kind"]})
    lines += ["", "GPU time of one decode step by kernel kind (eager step, profiler; ms, kernels):",
              "", "| batch | " + " | ".join(kinds) + " | all kernels |",
              "| --- " * (len(kinds) + 2) + "|"]
    for prof in record["profile"]:
        cells = " | ".join(f"{prof['by_kind'][k]['ms']:.2f} ({prof['by_kind'][k]['kernels']:.0f})"
                           if k in prof["by_kind"] else "" for k in kinds)
        lines.append(f"| {prof['batch']} | {cells} | "
                     f"{prof['kernel_ms']:.2f} ({prof['kernels']:.0f}) |")
    p = record["prefill"]
    lines += ["", "| prefill tokens | ms | tokens/s | TFLOP/s | of matmul rate |",
              "| --- | --- | --- | --- | --- |",
              f"| {p['tokens']} | {p['ms']:.1f} | {p['tokens_per_s']:.0f} | {p['tflops']:.0f} | "
              f"{p['over_matmul_rate']:.0%} |", "",
              f"Decode attention kernel alone, one layer, context {CONTEXT} (us; CUDA graph of 10 "
              "launches on 10 layers' caches):", ""]
    lines += _kernel_table(record["attention_kernel"])
    (out_dir / "gpu_engine.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_engine needs a CUDA GPU")
    import triton

    copy_bw, matmul = copy_bandwidth(), matmul_rate()
    print(f"copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {matmul / 1e12:.0f} TFLOP/s", flush=True)
    decode_blocks = max(DECODE_BATCHES) * -(-CONTEXT // BLOCK_SIZE)
    t0 = time.perf_counter()
    runner = build_runner(max(DECODE_BATCHES), PREFILL_TOKENS + 256,
                          decode_blocks + -(-PREFILL_TOKENS // BLOCK_SIZE))
    print(f"model + cache + graphs ready in {time.perf_counter() - t0:.1f} s; "
          f"{torch.cuda.memory_reserved() / 2**30:.1f} GiB held", flush=True)
    decode = [bench_decode(runner, b, copy_bw) for b in DECODE_BATCHES]
    print(f"{'batch':>5} {'step ms':>8} {'replay ms':>9} {'eager ms':>8} {'floor ms':>8} "
          f"{'step/floor':>10}")
    for d in decode:
        print(f"{d['batch']:>5} {d['step_ms']:>8.2f} {d['graph_replay_ms']:>9.2f} "
              f"{d['eager_step_ms']:>8.2f} {d['floor_ms']:>8.2f} {d['step_over_floor']:>9.2f}x",
              flush=True)
    profiles = [profile_step(runner, b) for b in DECODE_BATCHES]
    for prof in profiles:
        print(f"b{prof['batch']}: {prof['kernel_ms']:.2f} ms in {prof['kernels']:.0f} kernels: "
              + ", ".join(f"{k} {v['ms']:.2f}" for k, v in sorted(prof["by_kind"].items())),
              flush=True)
    prefill = bench_prefill(runner, matmul, first_block=decode_blocks)
    print(f"prefill {prefill['tokens']} tokens: {prefill['ms']:.1f} ms, "
          f"{prefill['tflops']:.0f} TFLOP/s = "
          f"{prefill['over_matmul_rate']:.0%} of the measured matmul rate", flush=True)
    kernel = bench_attention_kernel(runner, copy_bw)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda, "model": LLAMA3_8B.name, "num_params": LLAMA3_8B.num_params,
        "copy_bw_GBps": copy_bw / 1e9, "matmul_tflops": matmul / 1e12,
        "decode": decode, "profile": profiles, "prefill": prefill, "attention_kernel": kernel,
    }
    write_results(record, args.out_dir)
    for batch in DECODE_BATCHES:
        rows = [r for r in kernel if r["batch"] == batch]
        best, default = min(rows, key=lambda r: r["us"]), next(r for r in rows if r["is_default"])
        print(f"attention b{batch}: default {default['us']:.1f} us "
              f"({default['over_floor']:.2f}x floor, {default['splits']} splits); "
              f"best {best['us']:.1f} us ({best['over_floor']:.2f}x) at "
              f"{best['splits']} splits, block_n {best['block_n']}, {best['num_warps']} warps, "
              f"{best['num_stages']} stages")
    print(f"wrote {args.out_dir / 'gpu_engine.json'} and .md")


if __name__ == "__main__":
    main()
