"""Measures one engine on the device at hand for the planner (`pdserve profile`).

Every point is a real engine step (`LLMEngine.step_log`, the same `StepStats` workers report):
- prefill: one random prompt (no prefix-cache hit) per length, a single step;
- chunked: a prompt prefilled in capped chunks (`prefill_chunk`), and a prompt whose prefix is
  in the prefix cache (a hit): each step's new tokens and the context before them;
- decode: `batch` copies of one prompt of `context` tokens (the first computes it, the others
  hit the prefix cache), then a few decode steps;
- mixed: such a batch decoding while one new prompt of `chunk` tokens is prefilled beside it;
- transfers: bench/transfer.py's ZMQ benchmark (stream and frames payload paths, loopback,
  separate processes) on CPU; NCCL via bench/transfer_nccl.py when CUDA shows >= 2 devices.
Points run from cheap to expensive and each phase stops when its share of `--budget-s` is
spent (prefill and decode always measure their cheapest point), so the profile is written in
bounded time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.step_stats import StepStats

PHASES = {"prefill": 0.2, "chunked": 0.15, "decode": 0.3, "mixed": 0.2, "transfers": 0.15}


class Budget:
    def __init__(self, seconds: float, log: Callable[[str], None]) -> None:
        self.total, self.start, self.log = seconds, time.perf_counter(), log
        self.phase_end = self.start

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def begin(self, phase: str) -> None:
        self.phase_end = max(self.phase_end, time.perf_counter()) + PHASES[phase] * self.total
        self.log(f"[{self.elapsed:5.1f}/{self.total:.0f} s] {phase}")

    def left(self, estimate_s: float = 0.0) -> bool:
        """Whether a point expected to take `estimate_s` still fits the phase (and the whole
        budget, plus a tenth for the last point)."""
        now = time.perf_counter() + estimate_s
        return now < self.phase_end and now < self.start + 1.1 * self.total


class Profiler:
    def __init__(self, engine: LLMEngine, budget: Budget, seed: int = 0) -> None:
        self.engine, self.budget = engine, budget
        self.rng = random.Random(seed)
        self.steps: list[StepStats] = []
        limits = engine.plan
        self.max_len = limits.max_model_len
        self.max_batched = engine.config.max_num_batched_tokens
        self.capacity = limits.num_tokens
        # on CUDA a new shape may compile kernels on its first run: time it twice, keep the last
        self.repeats = 2 if engine.config.torch_device.type == "cuda" else 1

    def _prompt(self, n: int) -> list[int]:
        vocab = self.engine.model_config.vocab_size
        return [self.rng.randrange(100, vocab) for _ in range(n)]

    def _run(self, prompts: list[list[int]], max_tokens: int | list[int],
             arrivals: list[int] | None = None, chunk: int = 0) -> list[StepStats]:
        self.engine.step_log.clear()
        outs = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        if chunk:
            for i, (p, m) in enumerate(zip(prompts, outs, strict=True)):
                self.engine.add_request(f"profile-{id(p)}-{i}", p, SamplingParams(
                    max_tokens=m, temperature=0.0, ignore_eos=True), prefill_chunk=chunk)
            while self.engine.has_unfinished:
                self.engine.step()
        else:
            self.engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0,
                                                          ignore_eos=True) for m in outs],
                                 arrival_steps=arrivals)
        steps = list(self.engine.step_log)
        self.steps += steps
        return steps

    def prefill(self) -> list[list[float]]:
        self.budget.begin("prefill")
        rows, n, last = [], 16, 0.0
        top = min(self.max_batched, self.max_len - 8)
        while n <= top and (not rows or self.budget.left(2.5 * last)):  # >= 1 point
            step = [self._run([self._prompt(n)], 1)[0] for _ in range(self.repeats)][-1]
            rows.append([n, step.seconds])
            last = step.seconds
            self.budget.log(f"  prefill {n} tokens: {step.seconds * 1000:.1f} ms")
            n = n * 2 if n * 2 <= top or n == top else top
        return rows

    def chunked(self) -> list[list[float]]:
        self.budget.begin("chunked")
        rows: list[list[float]] = []
        # a GPU serves prompts of thousands of tokens in a few big chunks: measure those (a
        # context term fitted on small chunks alone extrapolates badly); a CPU takes ~1k
        length = min(4096 if self.repeats > 1 else 1024, self.max_len - 8, self.max_batched)
        for chunk in (length // 4, length // 8, 64):
            if not self.budget.left():
                break
            for _ in range(self.repeats - 1):  # CUDA: a first run may compile for new shapes
                self._run([self._prompt(length)], 1, chunk=chunk)  # same shapes, no cache hit
            for s in self._run([self._prompt(length)], 1, chunk=chunk):
                if s.num_prefill_tokens:
                    rows.append([s.num_prefill_tokens,
                                 s.num_context_tokens - s.num_prefill_tokens, s.seconds])
            self.budget.log(f"  {length} tokens in chunks of {chunk}: {len(rows)} points")
        for cached in (length // 2, 3 * length // 4):
            if not self.budget.left():
                break
            prefix = self._prompt(cached)
            self._run([prefix], 1)
            step = self._run([prefix + self._prompt(length - cached)], 1)[0]
            rows.append([step.num_prefill_tokens,
                         step.num_context_tokens - step.num_prefill_tokens, step.seconds])
            self.budget.log(f"  prefix hit {cached}/{length}: {step.seconds * 1000:.1f} ms")
        return rows

    def _batch_steps(self, batch: int, context: int, decode_steps: int,
                     extra: list[int] | None = None) -> list[StepStats]:
        base = self._base_prompts.setdefault(context, self._prompt(context))
        prompts = [base] * batch + ([extra] if extra else [])
        arrivals = [0] + [1] * (batch - 1) + ([3] if extra else [])
        outs = [decode_steps + 3] * batch + ([1] if extra else [])
        return self._run(prompts, outs, arrivals)

    def decode(self) -> list[list[float]]:
        self.budget.begin("decode")
        self._base_prompts: dict[int, list[int]] = {}
        rows = []
        contexts = [c for c in (128, 512, 2048, 4096, 8192, 16384, 32768)
                    if c + 64 <= self.max_len] or [max(16, self.max_len // 2)]
        if self.max_len - 64 > 1.25 * contexts[-1]:  # the longest contexts too
            contexts.append(self.max_len - 64)
        # every batch up to 8: step time is not smooth in the batch (this CPU, 2026-12-06:
        # batch 3 and 7 ran 1.2-1.3x what 2 and 4 interpolate to, batch 4 faster than 3)
        batches = [b for b in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64, 128)
                   if b <= self.engine.config.max_num_seqs]
        # cheap first: a context is prefilled once (then hit), a batch costs every step
        for batch, context in sorted(((b, c) for b in batches for c in contexts),
                                     key=lambda bc: bc[1] / 64 + bc[0]):
            if batch * (context + 32) > self.capacity or (rows and not self.budget.left()):
                continue  # the first point always runs: a profile needs one
            steps = [s for s in self._batch_steps(batch, context, 4)
                     if s.num_decode_seqs == batch and not s.num_prefill_tokens]
            if steps:
                seconds = statistics.median(s.seconds for s in steps)
                mean_ctx = statistics.fmean(s.num_context_tokens for s in steps) / batch
                rows.append([batch, round(mean_ctx, 1), seconds])
                self.budget.log(f"  decode batch {batch} x {context} tokens: "
                                f"{seconds * 1000:.1f} ms")
        return rows

    def mixed(self) -> list[list[float]]:
        self.budget.begin("mixed")
        rows = []
        context = min(512, self.max_len - 64)
        # 16 and 32: the chunks the TPOT-aware cap cuts local prompts into beside a batch
        for chunk in (16, 32, 64, 256, 1024):
            for batch in (1, 8, 32):
                if (not self.budget.left() or chunk + batch > self.max_batched
                        or batch > self.engine.config.max_num_seqs
                        or batch * (context + 32) + chunk > self.capacity):
                    continue
                runs = [self._batch_steps(batch, context, 6, self._prompt(chunk))
                        for _ in range(self.repeats)]
                for s in runs[-1]:
                    if s.num_prefill_tokens == chunk and s.num_decode_seqs == batch:
                        rows.append([batch, round((s.num_context_tokens - chunk) / batch, 1),
                                     chunk, s.seconds])
                        self.budget.log(f"  mixed batch {batch} + chunk {chunk}: "
                                        f"{s.seconds * 1000:.1f} ms")
        return rows


def measure_transfers(budget: Budget, num_cuda: int) -> dict[str, Any]:
    """[bytes, seconds] per transport; a string where one was not measured."""
    budget.begin("transfers")
    out: dict[str, Any] = {}
    if budget.total * PHASES["transfers"] < 8:
        reason = "not measured: --budget-s too small (ZMQ transfers take ~10 s)"
        out.update(stream=reason, frames=reason)
    else:
        from bench.transfer import run_zmq

        args = argparse.Namespace(tokens=[256, 2048], repeats=2, endpoint="tcp://127.0.0.1:0",
                                  chunk_kib=1024)
        result = run_zmq(args)
        for name, key in (("stream", "zmq_gbps"), ("frames", "zmq_frames_gbps")):
            out[name] = [[r["bytes"], r["bytes"] / (r[key] * 1e9)] for r in result["rows"]]
    if num_cuda >= 2:
        try:
            from bench.transfer_nccl import run_nccl

            args = argparse.Namespace(tokens=[1024, 4096], repeats=5, chunk_mib=[128],
                                      ready_chunk_mib=[], nonblocking_chunk_mib=[])
            rows = run_nccl(args)["rows"]
            out["nccl"] = [[r["bytes"], r["bytes"] / (r["pdserve_nccl_gbps"] * 1e9)]
                           for r in rows]
        except (Exception, SystemExit) as e:  # a failed optional measurement is reported
            out["nccl"] = f"not measured: {type(e).__name__}: {e}"
    else:
        out["nccl"] = (f"not measured: NCCL needs 2 CUDA devices on this host, found {num_cuda} "
                       "(bench/transfer.py --nccl on a 2-GPU host measures it)")
    return out


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
