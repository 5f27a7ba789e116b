"""LLMEngine: the colocated reference engine (scheduler + model runner + tokenizer).

Requests join and leave the running batch every step. This is the engine a decode worker
runs for local (colocated) prefill and the baseline the disaggregated path must match.

With `--tensor-parallel-size N` the engine is rank 0 of N: it schedules and samples; its
runner sends each step's inputs to the other ranks, which `engine/tp_executor.py` starts and
stops (`close()`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from engine.checkpoint import Checkpoint, load_checkpoint, read_model_config
from engine.config import EngineConfig
from engine.errors import EngineError, RequestError
from engine.grammar_runtime import GrammarRuntime
from engine.kv_cache_manager import KvCacheManager
from engine.memory_plan import KvPlan, plan_kv_cache
from engine.model_runner import ModelRunner, ScheduledSeq
from engine.outputs import FinishReason, TokenLogprob
from engine.sampler import SampleResult
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.step_stats import StepStats
from engine.tp_executor import TpExecutor, load_rank
from engine.tp_group import TpGroup
from engine.tp_launch import RankLauncher
from engine.tp_service import RankService

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    is_finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    error: str | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # with the first output


def _set_cuda_device(config: EngineConfig) -> None:
    """Kernels, graphs and streams all go to this worker's GPU."""
    device = config.torch_device
    if device.type == "cuda":
        # a bare "cuda" means the current device (set_device refuses it on torch >= 2.11)
        torch.cuda.set_device(device.index if device.index is not None
                              else torch.cuda.current_device())


class LLMEngine:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint, plan: KvPlan,
                 tp: TpGroup | None = None, executor: TpExecutor | None = None) -> None:
        self.config, self.plan, self.executor = config, plan, executor
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        torch.manual_seed(config.seed)
        _set_cuda_device(config)
        self.runner = ModelRunner(checkpoint.config, checkpoint.weights, plan, config.torch_dtype,
                                  config.torch_device, tp=tp)
        self.cache = KvCacheManager(plan.num_blocks, plan.spec.block_size,
                                    config.enable_prefix_caching)
        eos = tuple(checkpoint.tokenizer.eos_token_ids) or checkpoint.config.eos_token_ids
        self.runner.grammars = GrammarRuntime(checkpoint.tokenizer, eos)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, plan.max_model_len,
                            checkpoint.config.vocab_size),
            self.cache, eos)
        self._seqs: dict[str, Sequence] = {}
        self._num_emitted: dict[str, int] = {}
        # every executed step, for the worker's heartbeats (the proxy fits its cost models to
        # them); appended here, drained by another thread: deque's ends are thread-safe
        self.step_log: deque[StepStats] = deque(maxlen=1024)

    @classmethod
    def from_config(cls, config: EngineConfig, log_plan: bool = True,
                    rank_service: RankService | None = None,
                    rank_launcher: RankLauncher | None = None) -> LLMEngine:
        """Plan memory from the model's metadata first (fails fast), then load the weights.
        `rank_service`: what each follower rank runs beside the model (engine/tp_service.py);
        `rank_launcher`: how the follower ranks start (engine/tp_launch.py; default: local
        processes)."""
        plan = plan_kv_cache(read_model_config(config.model), config)
        if log_plan:
            log.info(plan.line())
        t0 = time.perf_counter()
        if config.tensor_parallel_size == 1:
            checkpoint = load_checkpoint(config.model, config.torch_dtype, config.load_format)
            engine = cls(config, checkpoint,
                         plan_kv_cache(checkpoint.config, config, checkpoint.identity))
        else:
            _set_cuda_device(config)
            executor = TpExecutor.start(config, rank_service, rank_launcher)
            try:
                checkpoint, plan = load_rank(config, executor.tp)
                engine = cls(config, checkpoint, plan, executor.tp, executor)
            except BaseException:
                executor.shutdown()
                raise
        log.info("loaded %s in %.1f s on %s (%s, tensor parallel %d)", config.model,
                 time.perf_counter() - t0, config.torch_device, config.torch_dtype,
                 config.tensor_parallel_size)
        return engine

    @property
    def rank_pids(self) -> list[int]:
        """The pid of every tensor-parallel rank, rank 0 (this process) first."""
        import os

        return [os.getpid(), *(self.executor.pids if self.executor else [])]

    def check_ranks(self) -> None:
        """Raise TpError if one of the other tensor-parallel ranks is gone (no-op without TP)."""
        if self.executor is not None:
            self.executor.check_alive()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do without TP); idempotent."""
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prefill_chunk: int = 0) -> Sequence:
        """Queue a request; `prefill_chunk` > 0 caps the prompt tokens a step computes while it
        prefills (with other sequences decoding, a smaller chunk keeps their steps short)."""
        if request_id in self._seqs:
            raise EngineError(f"duplicate request id {request_id!r}")
        if prefill_chunk < 0:
            raise RequestError(f"prefill chunk must be >= 0, got {prefill_chunk}")
        if params.prompt_logprobs is not None and not self.runner.tp.is_single:
            raise RequestError(f"prompt_logprobs is not supported yet by a tensor-parallel "
                               f"engine (--tensor-parallel-size {self.runner.tp.size})")
        seq = Sequence(request_id, list(prompt_ids), params, prefill_chunk=prefill_chunk)
        self.scheduler.add(seq)  # raises RequestError for a request that can never run
        self._seqs[request_id] = seq
        self._num_emitted[request_id] = 0
        return seq

    def abort(self, request_id: str) -> None:
        if self.scheduler.abort(request_id) is not None:
            self._seqs.pop(request_id, None)
            self._num_emitted.pop(request_id, None)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        results = self.execute(batch)
        self.scheduler.postprocess(batch, results)
        outputs = []
        for s in batch:
            out = self._output(s.seq)
            if out.new_token_ids or out.is_finished:
                outputs.append(out)
        return outputs

    def execute(self, batch: list[ScheduledSeq]) -> dict[str, SampleResult]:
        """Run one scheduled batch through the model, recording what it held and its time."""
        t0 = time.perf_counter()
        results = self.runner.execute(batch)
        seconds = time.perf_counter() - t0
        stats = StepStats(seconds, sum(s.num_tokens for s in batch if s.num_tokens > 1),
                          sum(1 for s in batch if s.num_tokens == 1),
                          sum(s.seq.num_computed_tokens + s.num_tokens for s in batch))
        self.step_log.append(stats)
        if log.isEnabledFor(logging.DEBUG):
            _log_step(stats, batch)
        return results

    def _output(self, seq: Sequence) -> RequestOutput:
        emitted = self._num_emitted[seq.seq_id]
        new = seq.output_ids[emitted:]
        self._num_emitted[seq.seq_id] = emitted + len(new)
        if seq.is_finished:
            self._seqs.pop(seq.seq_id, None)
            self._num_emitted.pop(seq.seq_id, None)
        return RequestOutput(seq.seq_id, new, seq.logprobs[emitted:emitted + len(new)],
                             seq.is_finished, seq.finish_reason, seq.num_prompt_tokens,
                             seq.num_cached_tokens,
                             prompt_logprobs=seq.prompt_logprobs if emitted == 0 and new else [])

    # ---- disaggregated decode: reservations filled by a prefill worker ---------------------
    def reserve(self, request_id: str, prompt_ids: list[int],
                params: SamplingParams) -> Sequence | None:
        """Allocate blocks for a prompt whose K/V will arrive from a prefill worker.

        Returns None (nothing taken) when the blocks are not free right now; raises RequestError
        for a prompt that can never run. The reservation owns its blocks until `adopt_prefilled`
        (they pass to the running batch) or `release` (they are freed). Under tensor
        parallelism the same block ids hold the prompt on every rank: the caller has every
        rank's heads written there (decode/tp_inbox.py) before `adopt_prefilled`.
        """
        if request_id in self._seqs:
            raise EngineError(f"duplicate request id {request_id!r}")
        seq = Sequence(request_id, list(prompt_ids), params)
        self.scheduler.check_admissible(seq)
        if not self.cache.can_allocate(seq, use_prefix_cache=False):
            return None
        self.cache.allocate(seq, use_prefix_cache=False)  # the prefill worker writes every block
        self._seqs[request_id] = seq
        self._num_emitted[request_id] = 0
        return seq

    def adopt_prefilled(self, seq: Sequence, first_token: int,
                        first_logprob: TokenLogprob | None) -> RequestOutput:
        """The reservation's prompt K/V is in its blocks: append the first token and join the
        batch."""
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.cache.commit_computed(seq)
        seq.token_ids.append(first_token)
        if first_logprob is not None:
            seq.logprobs.append(first_logprob)
        reason = self.scheduler.stop_reason(seq)
        if reason is None:
            self.scheduler.add_running(seq)
        else:
            self.scheduler.finish(seq, reason)
        return self._output(seq)

    def release(self, seq: Sequence) -> None:
        """Free a reservation that will never be filled (abort, timeout, failed transfer)."""
        self.cache.free(seq)
        self._seqs.pop(seq.seq_id, None)
        self._num_emitted.pop(seq.seq_id, None)

    def prefill_locally(self, seq: Sequence) -> None:
        """Turn a reservation into a local prefill (its prefill worker is gone)."""
        self.cache.free(seq)
        seq.num_cached_tokens = 0
        self.scheduler.add(seq)

    # ---- convenience ------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 arrival_steps: list[int] | None = None) -> list[Sequence]:
        """Run prompts to completion as one continuous batch; request i joins at step
        arrival_steps[i]."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        arrivals = arrival_steps or [0] * len(prompts)
        pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
        seqs: dict[int, Sequence] = {}
        step = 0
        while pending or self.has_unfinished:
            while pending and arrivals[pending[0]] <= step:
                i = pending.pop(0)
                seqs[i] = self.add_request(f"gen-{id(self)}-{i}", prompts[i], params_list[i])
            self.step()
            step += 1
        return [seqs[i] for i in range(len(prompts))]

    def check_idle_integrity(self) -> None:
        """When nothing runs, every block must be free and the pool consistent."""
        self.cache.pool.check_integrity()
        if not self.has_unfinished and self.cache.pool.num_used:
            raise EngineError(f"{self.cache.pool.num_used} KV blocks still used while idle")


def _log_step(stats: StepStats, batch: list[ScheduledSeq]) -> None:
    """One DEBUG line per step, with what the planner's step model takes (planner/profile.py
    `StepTimes.step_s`): prefill tokens and their token context (the sum over prompts of chunk
    tokens x tokens cached before the chunk), decoding sequences and the context they read."""
    chunks = [(s.num_tokens, s.seq.num_computed_tokens) for s in batch if s.num_tokens > 1]
    decode_ctx = sum(s.seq.num_computed_tokens + 1 for s in batch if s.num_tokens == 1)
    log.debug("step %.1f ms: %d prefill tokens in %d prompts (token context %d), "
              "%d decoding over %d context tokens", stats.seconds * 1e3, stats.num_prefill_tokens,
              len(chunks), sum(n * c for n, c in chunks), stats.num_decode_seqs, decode_ctx)
