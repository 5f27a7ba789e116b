"""Tensor parallelism on CPU: SmolLM2 greedy tokens/s with TP=1 and TP=3 (gloo), one run.

Both engines run the same workload (batch 1 and a batch of 8 prompts, greedy, EOS ignored,
--new-tokens each), alternating TP=1, TP=3, TP=1, ... after a warm-up step, and the table
reports the median of --repeats runs. On a CPU with few cores TP cannot win (the ranks share
the cores and add an all-reduce per layer); the point of TP on CPU is correctness. The TP=3
tokens are checked against TP=1's. The load average before and after is recorded.

Run from the repository root: `python -m bench.tp_cpu [--repeats 3] [--new-tokens 32]`;
writes bench/results/tp_cpu_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

TEXTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
         "1, 1, 2, 3, 5, 8, 13,", "The history of Rome", "Water boils at",
         "My favourite book is", "In machine learning, attention"]


def _run(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    seqs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    return sum(s.num_output_tokens for s in seqs) / elapsed, [s.output_ids for s in seqs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tp", type=int, default=3)
    args = p.parse_args()
    load_before = os.getloadavg()
    engines = {tp: LLMEngine.from_config(EngineConfig(
        tensor_parallel_size=tp, kv_cache_memory="64MiB", max_model_len=512,
        enable_prefix_caching=False)) for tp in (1, args.tp)}
    tok = engines[1].tokenizer
    workloads = {"batch 1": [tok.encode(TEXTS[0])], "batch 8": [tok.encode(t) for t in TEXTS]}
    runs: dict[str, dict[int, list[float]]] = {w: {tp: [] for tp in engines} for w in workloads}
    same = True
    try:
        for name, prompts in workloads.items():
            for engine in engines.values():
                _run(engine, prompts[:1], 2)  # warm-up
            for _ in range(args.repeats):
                outputs = {}
                for tp, engine in engines.items():
                    rate, outputs[tp] = _run(engine, prompts, args.new_tokens)
                    runs[name][tp].append(rate)
                same = same and outputs[1] == outputs[args.tp]
    finally:
        for engine in engines.values():
            engine.close()
    result = {"command": f"python -m bench.tp_cpu --repeats {args.repeats} --new-tokens "
                         f"{args.new_tokens} --tp {args.tp}",
              "date": datetime.date.today().isoformat(), "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
              "tokens_equal": same, "tokens_per_s": runs}
    out = Path("bench/results") / f"tp_cpu_{result['date']}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# TP=1 vs TP={args.tp}, SmolLM2-135M, CPU ({os.cpu_count()} cores)", "",
             f"`{result['command']}` on {result['date']}, {result['machine']}; load average "
             f"before {load_before[0]:.1f}, after {result['load_after'][0]:.1f}; "
             f"greedy tokens equal: {same}.", "",
             f"| workload | TP=1 tok/s | TP={args.tp} tok/s | ratio |",
             "| --- | --- | --- | --- |"]
    for name, by_tp in runs.items():
        a, b = statistics.median(by_tp[1]), statistics.median(by_tp[args.tp])
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
