"""What `--kv-wire-dtype` costs in output: greedy agreement and logprob drift vs uncompressed KV.

    python -m bench.kv_wire_dtype [--dtypes int8,fp8_e4m3] [--max-tokens 64] [--output PREFIX]

SmolLM2 on CPU (fp32 weights and cache), the fidelity prompts of
tests/integration/test_fidelity_smollm2.py plus the short prompts of the end-to-end tests.
Each prompt runs twice in one engine, greedy, EOS ignored: once as is (the reference), once
with its prompt KV sent through the wire dtype right after prefill — the blocks go through the
sender's quantizer (transfer/convert/wire_dtype.py) and the receiver's conversion back into the
fp32 cache, exactly the values a decode worker would hold — before decoding goes on. The first
token is the prefill's own (as in serving); the decode steps read the quantized prompt KV.

Per prompt: how many of the `--max-tokens` greedy tokens equal the reference before the first
difference, and the largest |logprob difference| of the chosen token over that common prefix
(where both runs condition on the same tokens). Writes PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import report
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import convert_kv
from transfer.convert.wire_dtype import to_wire, wire_spec

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["The three primary colors are", "Water boils at", "def add(a, b):\n    return"]


def prompts(engine: LLMEngine) -> dict[str, list[int]]:
    """The fidelity test's prompts (loaded from its file: one list of prompts) and SHORT."""
    path = ROOT / "tests" / "integration" / "test_fidelity_smollm2.py"
    spec = importlib.util.spec_from_file_location("fidelity_cases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    out = {case.name: module._prompt_ids(engine.tokenizer, case) for case in module.CASES}
    out.update({f"short_{i}": engine.tokenizer.encode(p) for i, p in enumerate(SHORT)})
    return out


def run(engine: LLMEngine, cache: PagedKvCache, rid: str, ids: list[int], max_tokens: int,
        wire_dtype: str) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    seq = engine.add_request(rid, ids, params)
    while seq.num_computed_tokens < seq.num_prompt_tokens:
        engine.step()
    spec = wire_spec(cache.spec, wire_dtype)
    if spec is not None:  # the prompt KV as a decode worker would receive it
        wire, table = to_wire(cache, seq.block_table, 0, seq.num_prompt_tokens, spec)
        convert_kv(wire, table, cache, seq.block_table, 0, seq.num_prompt_tokens)
    while engine.has_unfinished:
        engine.step()
    return seq


def compare(ref: Sequence, got: Sequence) -> dict[str, Any]:
    same = next((i for i, (a, b) in enumerate(zip(ref.output_ids, got.output_ids, strict=True))
                 if a != b), len(ref.output_ids))
    drift = max((abs(a.logprob - b.logprob) for a, b in
                 zip(ref.logprobs[:same], got.logprobs[:same], strict=True)), default=0.0)
    return {"num_tokens": len(ref.output_ids), "num_equal_prefix": same,
            "is_identical": same == len(ref.output_ids), "max_logprob_drift": drift}


def write(args: argparse.Namespace, argv: list[str] | None,
          rows: list[dict[str, Any]]) -> list[str]:
    """PREFIX.json and PREFIX.md from the rows so far; returns the markdown lines."""
    dtypes = [d for d in args.dtypes.split(",") if any(r["wire_dtype"] == d for r in rows)]
    command = "python -m bench.kv_wire_dtype " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    summary = {d: {"prompts": sum(r["wire_dtype"] == d for r in rows),
                   "identical": sum(r["is_identical"] for r in rows if r["wire_dtype"] == d),
                   "max_logprob_drift": max(r["max_logprob_drift"] for r in rows
                                            if r["wire_dtype"] == d)}
               for d in dtypes}
    report.write_json(f"{args.output}.json", {"command": command, "machine": report.machine(),
                                              "summary": summary, "rows": rows})
    lines = [f"# KV wire dtype: greedy agreement and logprob drift ({args.max_tokens} tokens)",
             "", f"Command: `{command}`", "",
             "| prompt | tokens | wire dtype | equal prefix | max logprob drift |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['prompt']} | {r['prompt_tokens']} | {r['wire_dtype']} | "
              f"{r['num_equal_prefix']}/{r['num_tokens']} | {r['max_logprob_drift']:.4f} |"
              for r in rows]
    lines += ["", "| wire dtype | identical outputs | max logprob drift (common prefix) |",
              "|---|---|---|"]
    lines += [f"| {d} | {s['identical']}/{s['prompts']} | {s['max_logprob_drift']:.4f} |"
              for d, s in summary.items()]
    Path(f"{args.output}.md").write_text("\n".join(lines) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv_wire_dtype", description=__doc__)
    p.add_argument("--dtypes", default="int8,fp8_e4m3")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--output",
                   default=f"bench/results/kv_wire_dtype_cpu_{time.strftime('%Y-%m-%d')}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    engine = LLMEngine.from_config(EngineConfig(
        model="smollm2", dtype="float32", kv_cache_memory="128MiB", max_model_len=1024,
        enable_prefix_caching=False), log_plan=False)
    cache = PagedKvCache(engine.plan.spec, engine.runner.kv_caches)
    rows: list[dict[str, Any]] = []
    for name, ids in prompts(engine).items():
        ref = run(engine, cache, f"{name}-ref", ids, args.max_tokens, "auto")
        for dtype in args.dtypes.split(","):
            got = run(engine, cache, f"{name}-{dtype}", ids, args.max_tokens, dtype)
            rows.append({"prompt": name, "prompt_tokens": len(ids), "wire_dtype": dtype,
                         **compare(ref, got)})
            print(rows[-1], flush=True)
            write(args, argv, rows)  # after every row: a run cut short keeps what it measured
    engine.check_idle_integrity()
    lines = write(args, argv, rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
