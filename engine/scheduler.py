"""Continuous-batching scheduler: which sequences run in the next step, and how many tokens each.

A step mixes decode steps (1 token) and prefill chunks under a token budget. Running sequences
go first (oldest first); waiting ones join while budget, `max_num_seqs` and blocks allow. When
a running sequence cannot grow, the newest running sequence is preempted by recompute: its
blocks are freed (prefix blocks stay cached) and it goes back to the front of the queue with
its generated tokens kept, so nothing is lost and counters never go negative.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field

from engine.errors import RequestError
from engine.kv_cache_manager import KvCacheManager
from engine.model_runner import ScheduledSeq
from engine.outputs import FinishReason
from engine.sampler import SampleResult
from engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    vocab_size: int = 0  # logit_bias ids are checked against it (0: unchecked)


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_prefix_hit_tokens: int = 0
    num_prompt_tokens: int = 0


@dataclass
class StepBudget:
    """What one step may still take: `tokens` in all (`max_num_batched_tokens`), and prompt
    tokens (chunks of more than one token), which each prefilling sequence's `prefill_chunk`
    caps: the step's prefill total stays within the smallest cap of the sequences it holds, so
    a local prefill placed beside a running batch never makes a step longer than the proxy
    planned."""

    tokens: int
    prefill_cap: int = sys.maxsize
    prefill_used: int = 0

    def grant(self, seq: Sequence) -> int:
        """Tokens `seq` may compute in this step (0: none now)."""
        n = min(seq.num_uncomputed_tokens, self.tokens)
        if seq.num_uncomputed_tokens > 1:
            cap = min(self.prefill_cap, seq.prefill_chunk or sys.maxsize)
            n = min(n, cap - self.prefill_used)
        return max(n, 0)

    def take(self, seq: Sequence, n: int) -> None:
        self.tokens -= n
        if n > 1 or seq.num_uncomputed_tokens > 1:
            self.prefill_used += n
            if seq.prefill_chunk:
                self.prefill_cap = min(self.prefill_cap, seq.prefill_chunk)


@dataclass
class Scheduler:
    config: SchedulerConfig
    cache: KvCacheManager
    eos_token_ids: tuple[int, ...] = ()
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    stats: SchedulerStats = field(default_factory=SchedulerStats)
    # preempted sequences waiting to be readmitted: their prefix hits then are their own
    # blocks found again, not cache hits (counted once, at first admission, as vLLM does)
    _preempted: set[str] = field(default_factory=set)

    # ---- admission --------------------------------------------------------------------------
    def check_admissible(self, seq: Sequence) -> None:
        """Raise RequestError for a request that could never run (fails alone, at admission)."""
        n = seq.num_prompt_tokens
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= self.config.max_model_len:
            raise RequestError(f"prompt of {n} tokens leaves no room for output within "
                               f"--max-model-len {self.config.max_model_len}")
        if self.cache.blocks_for(n + 1) > self.cache.pool.num_blocks:
            raise RequestError(f"prompt of {n} tokens needs more KV blocks than the cache has "
                               f"({self.cache.pool.num_blocks})")
        vocab = self.config.vocab_size
        bad = [t for t, _ in seq.params.logit_bias if vocab and t >= vocab]
        if bad:
            raise RequestError(f"logit_bias token id {bad[0]} is outside the vocabulary "
                               f"(0..{vocab - 1})")

    def add(self, seq: Sequence) -> None:
        self.check_admissible(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Adopt a sequence whose blocks are allocated and whose prompt K/V is already in them."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self._preempted.discard(seq_id)
                    self.finish(seq, FinishReason.ABORT)
                    return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.cache.free(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledSeq]:
        budget = StepBudget(self.config.max_num_batched_tokens)
        batch: list[ScheduledSeq] = []
        preempted = False
        for seq in list(self.running):
            if seq not in self.running:
                continue
            n = budget.grant(seq)
            if n == 0:
                continue
            while not self.cache.can_grow(seq, seq.num_computed_tokens + n):
                preempted = True
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.cache.grow(seq, seq.num_computed_tokens + n)
            batch.append(ScheduledSeq(seq, n))
            budget.take(seq, n)
        while self.waiting and budget.tokens > 0 and not preempted \
                and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.cache.can_allocate(seq) or budget.grant(seq) == 0:
                break
            self.waiting.popleft()
            first_cached = seq.num_cached_tokens
            cached = self.cache.allocate(seq)
            if seq.seq_id in self._preempted:
                self._preempted.discard(seq.seq_id)
                seq.num_cached_tokens = first_cached
            else:
                self.stats.num_prefix_hit_tokens += cached
                self.stats.num_prompt_tokens += seq.num_prompt_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = budget.grant(seq)  # after allocate: prefix-cache hits are computed already
            batch.append(ScheduledSeq(seq, n))
            budget.take(seq, n)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.cache.free(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self._preempted.add(seq.seq_id)
        self.stats.num_preemptions += 1

    def advance(self, batch: list[ScheduledSeq],
                results: dict[str, SampleResult]) -> list[Sequence]:
        """Record the step's computed tokens and sampled tokens; returns sequences that got one."""
        sampled = []
        for s in batch:
            seq = s.seq
            seq.num_computed_tokens += s.num_tokens
            self.cache.commit_computed(seq)
            result = results.get(seq.seq_id)
            if result is not None:
                seq.token_ids.append(result.token_id)
                if result.logprob is not None:
                    seq.logprobs.append(result.logprob)
                sampled.append(seq)
        return sampled

    def postprocess(self, batch: list[ScheduledSeq],
                    results: dict[str, SampleResult]) -> list[Sequence]:
        """Advance the batch after the model ran; returns sequences that finished this step."""
        finished = []
        for seq in self.advance(batch, results):
            reason = self.stop_reason(seq)
            if reason is not None:
                self.running.remove(seq)
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def detach(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch *with* its blocks: the caller now owns them
        and must hand them back with `cache.free(seq)` (a prefill worker, after the KV is sent)."""
        self.running.remove(seq)
        seq.status = SeqStatus.FINISHED

    def stop_reason(self, seq: Sequence) -> FinishReason | None:
        token, p = seq.token_ids[-1], seq.params
        is_stop_token = (token in p.stop_token_ids
                         or (not p.ignore_eos and token in self.eos_token_ids))
        if is_stop_token and seq.num_output_tokens >= p.min_tokens:
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None
