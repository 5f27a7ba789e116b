"""Guided decoding overhead on CPU: llguidance vs xgrammar per-token mask cost, and pdserve's
guided decoding vs unconstrained decoding end to end, SmolLM2, same run.

Three measurements, all in one process:
1. compile: time to compile each schema (cold, no cache) and compute the first mask;
2. mask: per-token time to compute the next-token bitmask and advance the matcher (median of
   5 replays, each from a fresh matcher of the compiled grammar), replaying
   the token sequence pdserve generated under the grammar (so both libraries walk the same
   path), per library; this is what a guided row adds to a decode step on the host;
3. end to end: pdserve's engine decoding the same prompts, guided (llguidance, through the
   batched sampler) vs unconstrained with the same number of tokens (ignore_eos, max_tokens =
   the guided output's length), batch 1 greedy and batch 4 seeded sampling; runs alternate,
   median of --repeats.
xgrammar is optional (`pip install xgrammar`); without it only llguidance is measured.
Results go to bench/results/grammar_overhead_cpu_<date>.{json,md}.

Run from the repository root: `python -m bench.grammar_overhead [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from llguidance import LLMatcher

from engine.config import EngineConfig
from engine.grammar_runtime import GrammarRuntime
from engine.guided import GuidedDecoding, GuidedKind, to_grammar
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

RESULTS = Path(__file__).parent / "results"
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"},
        "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"],
        "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 16},
            "color": {"enum": ["red", "green", "blue"]},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
            "required": ["name", "color", "address"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 4}},
        "required": ["person", "tags", "scores"], "additionalProperties": False},
}
MAX_TOKENS = 160
PROMPT = "Write a JSON record describing a person who lives in Paris."


def _xgrammar(tokenizer: Any, eos: list[int]) -> Any | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    encoded = [""] * tokenizer.vocab_size
    for tok, i in vocab.items():
        encoded[i] = tok
    info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=tokenizer.vocab_size,
                             stop_token_ids=eos)
    return xgr, xgr.GrammarCompiler(info, cache_enabled=False), info


def _replays(fresh: Any, tokens: list[int], step: Any, rounds: int = 5) -> float:
    """Median µs per token of `step(matcher, token)` over `rounds` replays, each on `fresh()`."""
    times = []
    for _ in range(rounds):
        matcher = fresh()
        t0 = time.perf_counter()
        for t in tokens:
            step(matcher, t)
        times.append((time.perf_counter() - t0) / len(tokens) * 1e6)
    return statistics.median(times)


def _time_llg(runtime: GrammarRuntime, guided: GuidedDecoding, tokens: list[int]) -> dict:
    mask = torch.full((1, runtime.num_words), -1, dtype=torch.int32)
    ptr, size = mask[0].data_ptr(), runtime.num_words * 4
    t0 = time.perf_counter()
    compiled = LLMatcher(runtime.lltokenizer, to_grammar(guided), log_level=0)
    compiled.deep_copy().unsafe_compute_mask_ptr(ptr, size)
    first_s = time.perf_counter() - t0

    def step(matcher: LLMatcher, t: int) -> None:
        matcher.unsafe_compute_mask_ptr(ptr, size)
        if not matcher.consume_token(t):
            raise RuntimeError(f"llguidance rejected token {t}")

    return {"compile_and_first_mask_ms": first_s * 1e3,
            "mask_us_per_token": _replays(compiled.deep_copy, tokens, step)}


def _time_xgr(xg: Any, schema: dict, tokens: list[int]) -> dict:
    xgr, compiler, info = xg
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(mask)
    first_s = time.perf_counter() - t0

    def step(matcher: Any, t: int) -> None:
        matcher.fill_next_token_bitmask(mask)
        if not matcher.accept_token(t):
            raise RuntimeError(f"xgrammar rejected token {t}")

    return {"compile_and_first_mask_ms": first_s * 1e3,
            "mask_us_per_token": _replays(lambda: xgr.GrammarMatcher(compiled), tokens, step)}


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple:
    t0 = time.perf_counter()
    seqs = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    return seconds, [s.output_ids for s in seqs]


def _end_to_end(engine: LLMEngine, guided: GuidedDecoding, batch: int, repeats: int) -> dict:
    prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}]))
    greedy = batch == 1
    g_params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0 if greedy else 1.0,
                               seed=None if greedy else i, guided=guided) for i in range(batch)]
    _, outs = _run(engine, [prompt] * batch, g_params)  # warm-up; also fixes the lengths
    u_params = [SamplingParams(max_tokens=len(o), temperature=p.temperature, seed=p.seed,
                               ignore_eos=True) for o, p in zip(outs, g_params, strict=True)]
    num_tokens = sum(len(o) for o in outs)
    guided_s, free_s = [], []
    for _ in range(repeats):
        free_s.append(_run(engine, [prompt] * batch, u_params)[0])
        seconds, again = _run(engine, [prompt] * batch, g_params)
        guided_s.append(seconds)
        if again != outs:
            raise RuntimeError("guided decoding is not reproducible run to run")
    g, u = statistics.median(guided_s), statistics.median(free_s)
    return {"batch": batch, "num_tokens": num_tokens, "guided_s": g, "unconstrained_s": u,
            "guided_ms_per_token": g / num_tokens * 1e3 * batch,
            "unconstrained_ms_per_token": u / num_tokens * 1e3 * batch,
            "overhead_ms_per_step": (g - u) / (num_tokens / batch) * 1e3,
            "ratio": g / u, "example": engine.tokenizer.decode(outs[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,4", help="end-to-end batch sizes, comma-separated")
    args = ap.parse_args()
    torch.manual_seed(0)
    engine = LLMEngine.from_config(EngineConfig(model="smollm2", dtype="float32",
                                                kv_cache_memory="128MiB", max_model_len=1024),
                                   log_plan=False)
    runtime = engine.runner.grammars
    if runtime is None:
        raise SystemExit("the engine has no grammar runtime")
    eos = list(engine.scheduler.eos_token_ids)
    xg = _xgrammar(engine.tokenizer, eos)
    load0 = os.getloadavg()
    out: dict[str, Any] = {"schemas": {}, "command": " ".join(["python -m bench.grammar_overhead",
                                                               *sys.argv[1:]])}
    for name, schema in SCHEMAS.items():
        guided = GuidedDecoding(GuidedKind.JSON_SCHEMA, json.dumps(schema))
        prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}]))
        tokens = engine.generate([prompt], SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0.0, guided=guided))[0].output_ids
        masks = {"llguidance": _time_llg(runtime, guided, tokens)}
        if xg is not None:
            masks["xgrammar"] = _time_xgr(xg, schema, tokens)
        print(name, masks, flush=True)
        e2e = [_end_to_end(engine, guided, int(b), args.repeats) for b in args.batches.split(",")]
        print(name, e2e, flush=True)
        out["schemas"][name] = {"end_to_end": e2e, "mask": masks, "num_tokens": len(tokens)}
        _write(out, load0)  # after each schema, so a long run leaves what it measured


def _write(out: dict[str, Any], load0: tuple[float, float, float]) -> None:
    out["env"] = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
                  "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "torch": torch.__version__, "python": platform.python_version(),
                  "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                  "llguidance": _version("llguidance"), "xgrammar": _version("xgrammar")}
    stem = RESULTS / f"grammar_overhead_cpu_{out['env']['date']}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    stem.with_suffix(".md").write_text(_markdown(out))


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _markdown(out: dict[str, Any]) -> str:
    env = out["env"]
    lines = [f"# Guided decoding overhead, CPU ({env['date']})", "",
             f"`{out['command']}` on {env['cpus']} CPUs ({env['machine']}), torch "
             f"{env['torch']} ({env['torch_threads']} threads), llguidance {env['llguidance']}, "
             f"xgrammar {env['xgrammar']}; load average before {env['loadavg_before'][0]:.2f}, "
             f"after {env['loadavg_after'][0]:.2f}. SmolLM2-135M fp32.", "",
             "## Per-token mask cost (host; compute the bitmask + advance the matcher)", "",
             "| schema | tokens | library | compile + first mask ms | mask µs/token |",
             "|---|---|---|---|---|"]
    for name, s in out["schemas"].items():
        for lib, m in s["mask"].items():
            first = m["compile_and_first_mask_ms"]
            lines.append(f"| {name} | {s['num_tokens']} | {lib} | {first:.1f} | "
                         f"{m['mask_us_per_token']:.1f} |")
    lines += ["", "## End to end: pdserve guided (llguidance) vs unconstrained, same tokens", "",
              "| schema | batch | tokens | unconstrained ms/token | guided ms/token | "
              "overhead ms/step | ratio |", "|---|---|---|---|---|---|---|"]
    for name, s in out["schemas"].items():
        for e in s["end_to_end"]:
            lines.append(f"| {name} | {e['batch']} | {e['num_tokens']} | "
                         f"{e['unconstrained_ms_per_token']:.2f} | {e['guided_ms_per_token']:.2f}"
                         f" | {e['overhead_ms_per_step']:.2f} | {e['ratio']:.3f} |")
    lines += ["", "ms/token is per sequence (step time); batch 1 is greedy, larger batches sample "
              "with seeds 0..n-1 at temperature 1.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
