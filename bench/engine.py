"""Engine micro-benchmark: our LLMEngine vs transformers `generate` on SmolLM2, same CPU, one run.

Two workloads, both greedy with EOS ignored so every request generates exactly --new-tokens:
- batch 1: one prompt;
- 16 concurrent requests of mixed prompt lengths: transformers batches them statically (left
  padding + attention mask, one `generate` call); ours runs them as one continuous batch.
Runs alternate (ours, transformers, ours, ...) after a warm-up, so background load hits both
alike; the table reports the median of --repeats runs (the JSON also has every run and the best).
Output tokens/s counts generated tokens over wall time including prefill. Our prefix cache is
off, so repeats recompute every prompt as transformers does. The load average before and after
is recorded: on a 2-core machine another busy process slows torch's 2-thread kernels many times
over, and such numbers are not worth quoting. The JSON goes to bench/results/engine_cpu.json.

Run from the repository root: `python -m bench.engine [--repeats 3] [--new-tokens 64]`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import resolve_model_path
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

RESULT_PATH = Path(__file__).parent / "results" / "engine_cpu.json"
_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press into a "
    "system that could produce books quickly and cheaply. Within fifty years presses were "
    "operating in more than two hundred European cities, and millions of volumes had been "
    "printed. Literacy spread, scientific results circulated faster, and the Reformation used "
    "pamphlets to reach ordinary readers. "
)


def make_prompts(tokenizer: Any, num: int) -> list[list[int]]:
    """`num` prompts, 8 to ~400 tokens: real text cut at varied lengths, some chat-templated."""
    words = (_TEXT * 6).split()
    prompts = []
    for i in range(num):
        text = " ".join(words[: 6 + (i * 37) % 300])
        if i % 3 == 0:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        prompts.append(tokenizer.encode(text))
    return prompts


def run_ours(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> int:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params)
    return sum(len(s.output_ids) for s in seqs)


def run_hf(model: Any, prompts: list[list[int]], new_tokens: int, pad_id: int) -> int:
    """One static batch: left padding + attention mask, as transformers batches generation."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             pad_token_id=pad_id)
    return (out.shape[1] - width) * len(prompts)


def timed(fn: Callable[[], int]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, generated tokens)."""
    t0, c0 = time.perf_counter(), time.process_time()
    num_tokens = fn()
    return time.perf_counter() - t0, time.process_time() - c0, num_tokens


def load_models() -> tuple[LLMEngine, Any, dict[str, float]]:
    import transformers

    t0 = time.perf_counter()
    engine = LLMEngine.from_config(EngineConfig(
        model="smollm2", dtype="float32", kv_cache_memory="512MiB", max_model_len=1024,
        max_num_seqs=64, enable_prefix_caching=False), log_plan=False)  # no reuse across repeats
    t1 = time.perf_counter()
    path = resolve_model_path("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return engine, model, {"ours_load_s": t1 - t0, "hf_load_s": time.perf_counter() - t1}


def bench_workload(engine: LLMEngine, model: Any, prompts: list[list[int]], new_tokens: int,
                   repeats: int, pad_id: int) -> dict[str, Any]:
    ours_fn = functools.partial(run_ours, engine, prompts, new_tokens)
    hf_fn = functools.partial(run_hf, model, prompts, new_tokens, pad_id)
    run_ours(engine, prompts, 4)  # warm-up (allocator, kernels, code paths)
    run_hf(model, prompts, 4, pad_id)
    ours, hf = [], []
    for _ in range(repeats):
        ours.append(timed(ours_fn))
        hf.append(timed(hf_fn))
    assert all(n == len(prompts) * new_tokens for *_, n in ours + hf), (ours, hf)
    num_tokens = len(prompts) * new_tokens
    ours_s, hf_s = statistics.median(r[0] for r in ours), statistics.median(r[0] for r in hf)
    ours_cpu, hf_cpu = statistics.median(r[1] for r in ours), statistics.median(r[1] for r in hf)
    return {
        "num_requests": len(prompts), "prompt_tokens": [len(p) for p in prompts],
        "new_tokens_per_request": new_tokens, "generated_tokens": num_tokens,
        "ours_s": [round(r[0], 3) for r in ours], "hf_s": [round(r[0], 3) for r in hf],
        "ours_cpu_s": [round(r[1], 3) for r in ours], "hf_cpu_s": [round(r[1], 3) for r in hf],
        "ours_tok_s": num_tokens / ours_s, "hf_tok_s": num_tokens / hf_s,
        "ratio": hf_s / ours_s,
        "best_ours_tok_s": num_tokens / min(r[0] for r in ours),
        "best_hf_tok_s": num_tokens / min(r[0] for r in hf),
        # CPU seconds resist time-slicing by other processes (meaningful with --threads 1).
        "cpu_ratio": hf_cpu / ours_cpu,
    }


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'workload':<16}{'tokens':>8}{'ours tok/s':>12}{'hf tok/s':>10}{'ours/hf':>9}"
          f"{'cpu-time ours/hf':>18}   runs ours | hf (s)")
    for name, r in results.items():
        print(f"{name:<16}{r['generated_tokens']:>8}{r['ours_tok_s']:>12.1f}{r['hf_tok_s']:>10.1f}"
              f"{r['ratio']:>8.2f}x{r['cpu_ratio']:>17.2f}x   {r['ours_s']} | {r['hf_s']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=RESULT_PATH)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    load_before = os.getloadavg()
    engine, model, load = load_models()
    pad_id = model.generation_config.pad_token_id or 0
    prompts = make_prompts(engine.tokenizer, args.concurrency)
    single = [engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]))]
    results = {
        "batch_1": bench_workload(engine, model, single, args.new_tokens, args.repeats, pad_id),
        f"concurrent_{args.concurrency}": bench_workload(
            engine, model, prompts, args.new_tokens, args.repeats, pad_id),
    }
    print_table(results)
    load_after = os.getloadavg()
    # Idle before we start; while we run, our own threads account for about nproc.
    busy = load_before[0] > 0.5 or load_after[0] > (os.cpu_count() or 1) + 0.5
    if busy:
        print(f"WARNING: load average {load_before[0]:.1f} before / {load_after[0]:.1f} after: "
              "other processes shared the CPU; rerun on an idle machine before quoting these")
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "nproc": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "model": "SmolLM2-135M-Instruct Q4_1 GGUF, fp32",
        "load": load, "loadavg_before": load_before, "loadavg_after": load_after,
        "machine_was_busy": busy, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
