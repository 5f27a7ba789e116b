"""The two worker models of the simulator: a prefill worker and a decode worker.

Both run steps as the engine's scheduler builds them (engine/scheduler.py): a step takes at
most `max_num_batched_tokens` tokens; running sequences go first, oldest first, one token each
when decoding; prompts are chunked to fit the budget and each sequence's chunk cap; waiting
sequences join while the budget, `max_num_seqs` and the KV cache allow. A step's duration comes
from the profile (`StepTimes.step_s`), times a draw of the simulation's step noise where it has
one (`noise(decode sequences in the step)`) and the co-run factor where workers share a host
(`shared(the step has prefill tokens)`: what the other workers run when it starts); tokens
appear when the step ends. Each server keeps
its last step as the engine reports it (`last_step`: seconds, prefill tokens, decode sequences,
context tokens as engine/llm_engine.py counts them) for the simulator's online cost models.

A `Job` is one request's simulated state; the servers own the jobs they hold and hand finished
or prefilled ones back to the simulator, which owns everything between servers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from planner.profile import StepTimes

Step = tuple[float, int, int, int]  # seconds, prefill tokens, decode sequences, context tokens


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if not (self.arrival_s >= 0 and self.prompt_tokens >= 1 and self.output_tokens >= 1):
            raise ValueError(f"a request needs arrival >= 0, prompt and output >= 1 token: {self}")


@dataclass
class Job:
    index: int
    request: SimRequest
    placement: str = "remote"  # remote | local
    chunk_cap: int = 0  # local: prompt tokens per step (0: no cap)
    decode: int = -1
    prefill: int = -1
    num_computed: int = 0  # prompt tokens computed
    num_generated: int = 0  # output tokens produced (the first comes from the prefill)
    first_token_s: float | None = None
    finish_s: float | None = None
    expected_first_s: float = 0.0  # when the placement rule predicted its first token

    @property
    def num_uncomputed(self) -> int:
        return self.request.prompt_tokens - self.num_computed

    @property
    def context(self) -> int:
        return self.request.prompt_tokens + self.num_generated


def kv_need(request: SimRequest, block_size: int) -> int:
    """Tokens of KV cache a request holds at its longest, rounded up to whole blocks."""
    total = request.prompt_tokens + request.output_tokens
    return math.ceil(total / block_size) * block_size


class PrefillServer:
    """Prefill worker: FIFO queue, steps of prompt chunks under the token budget."""

    def __init__(self, times: StepTimes, budget: int,
                 noise: Callable[[int], float] | None = None,
                 shared: Callable[[bool], float] | None = None) -> None:
        self.times, self.budget, self.noise, self.shared = times, budget, noise, shared
        self.last_step: Step = (0.0, 0, 0, 0)
        self.queue: deque[Job] = deque()
        self.batch: list[tuple[Job, int]] = []
        self.busy_until = 0.0

    def start_step(self, now: float) -> float | None:
        """Builds and starts the next step; its duration, or None when idle or busy."""
        if self.batch or not self.queue:
            return None
        left, tokens, token_context = self.budget, 0, 0.0
        for job in self.queue:
            if left <= 0:
                break
            n = min(job.num_uncomputed, left)
            self.batch.append((job, n))
            left, tokens = left - n, tokens + n
            token_context += n * job.num_computed
        seconds = self.times.step_s(tokens, token_context, 0, 0)
        seconds *= self.noise(0) if self.noise else 1.0
        seconds *= self.shared(True) if self.shared else 1.0
        self.last_step = (seconds, tokens, 0, tokens + sum(j.num_computed for j, _ in self.batch))
        self.busy_until = now + seconds
        return seconds

    def finish_step(self) -> list[Job]:
        """Ends the step; the jobs whose prompt is now fully computed (out of the queue)."""
        done = []
        for job, n in self.batch:
            job.num_computed += n
            if job.num_uncomputed == 0:
                done.append(job)
        self.batch = []
        for job in done:
            self.queue.remove(job)
        return done

    def queued_tokens(self) -> int:
        """Prompt tokens left after the step in progress (whose rest the placer's view counts
        as busy time): counting that step's tokens again made a busy prefill worker look a
        whole prompt longer and sent prompts local that the proxy sent remote (2026-12-07)."""
        return sum(j.num_uncomputed for j in self.queue) - sum(n for _, n in self.batch)


class DecodeServer:
    """Decode worker: continuous batching of decodes, received prompts and local prefills,
    with decode-first reservation of the KV cache (a request holds its blocks from
    reservation to finish)."""

    def __init__(self, times: StepTimes, budget: int, max_num_seqs: int, capacity: int,
                 block_size: int, noise: Callable[[int], float] | None = None,
                 shared: Callable[[bool], float] | None = None) -> None:
        self.times, self.budget, self.max_num_seqs = times, budget, max_num_seqs
        self.noise, self.shared = noise, shared
        self.last_step: Step = (0.0, 0, 0, 0)
        self.capacity, self.block_size = capacity, block_size
        self.kv_used = 0
        self.num_seqs = 0  # jobs holding KV here (reserved, prefilling, running)
        self.running: list[Job] = []  # decoding
        self.prefilling: list[Job] = []  # local prompts admitted, chunks left
        self.waiting: deque[Job] = deque()  # local prompts not admitted yet
        self.reserve_queue: deque[Job] = deque()  # remote prompts waiting for blocks
        self.inbound: list[Job] = []  # KV arrived, join at the next step
        self.batch: list[tuple[Job, int]] = []
        self.is_busy = False
        self.step_end_s = 0.0  # when the step in progress ends (while is_busy)

    # ---- reservation ---------------------------------------------------------------------
    def can_hold(self, job: Job) -> bool:
        return (self.num_seqs < self.max_num_seqs
                and self.kv_used + kv_need(job.request, self.block_size) <= self.capacity)

    def hold(self, job: Job) -> None:
        self.kv_used += kv_need(job.request, self.block_size)
        self.num_seqs += 1

    def reserve_or_queue(self, job: Job) -> bool:
        """A remote job: True when its blocks are reserved now, else it waits in line."""
        if not self.reserve_queue and self.can_hold(job):
            self.hold(job)
            return True
        self.reserve_queue.append(job)
        return False

    def release(self, job: Job) -> list[Job]:
        """Frees a finished job's blocks; the queued remote jobs now reserved, in order."""
        self.kv_used -= kv_need(job.request, self.block_size)
        self.num_seqs -= 1
        granted = []
        while self.reserve_queue and self.can_hold(self.reserve_queue[0]):
            granted.append(self.reserve_queue.popleft())
            self.hold(granted[-1])
        return granted

    # ---- steps ---------------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        return (len(self.running) + len(self.prefilling) + len(self.waiting)
                + len(self.reserve_queue) + len(self.inbound))

    def start_step(self, now: float) -> float | None:
        if self.is_busy:
            return None
        self.running += self.inbound
        self.inbound = []
        left = self.budget - len(self.running)
        cap_used, cap = 0, math.inf
        while self.waiting and self.can_hold(self.waiting[0]):
            self.hold(self.waiting[0])
            self.prefilling.append(self.waiting.popleft())
        tokens, token_context = 0, 0.0
        for job in self.prefilling:
            if job.chunk_cap:
                cap = min(cap, job.chunk_cap)
            n = int(min(job.num_uncomputed, left, cap - cap_used))
            if n <= 0:
                break
            self.batch.append((job, n))
            left, cap_used, tokens = left - n, cap_used + n, tokens + n
            token_context += n * job.num_computed
        if not self.running and not self.batch:
            return None
        self.is_busy = True
        decode_context = sum(j.context for j in self.running)
        seconds = self.times.step_s(tokens, token_context, len(self.running), decode_context)
        seconds *= self.noise(len(self.running)) if self.noise else 1.0
        seconds *= self.shared(tokens > 0) if self.shared else 1.0
        self.last_step = (seconds, tokens, len(self.running), decode_context + tokens
                          + sum(j.num_computed for j, _ in self.batch))
        self.step_end_s = now + seconds
        return seconds

    def finish_step(self, now: float) -> tuple[list[Job], list[Job]]:
        """Ends the step at `now`: (jobs that produced their first token, jobs finished)."""
        first, finished = [], []
        for job in self.running:
            job.num_generated += 1
            if job.num_generated >= job.request.output_tokens:
                job.finish_s = now
                finished.append(job)
        for job, n in self.batch:
            job.num_computed += n
            if job.num_uncomputed == 0:
                job.num_generated, job.first_token_s = 1, now
                first.append(job)
                if job.request.output_tokens <= 1:
                    job.finish_s = now
                    finished.append(job)
        self.batch = []
        self.is_busy = False
        self.running = [j for j in self.running if j.finish_s is None]
        self.prefilling = [j for j in self.prefilling if j.first_token_s is None]
        self.running += [j for j in first if j.finish_s is None]
        return first, finished
