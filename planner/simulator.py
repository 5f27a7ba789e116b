"""The discrete-event serving simulator: one cluster configuration, one list of requests.

What it models, in the order a request meets it (as pdserve runs it, README "One request"):
1. arrival (the workload's time); the decode worker is the least-loaded one (proxy/router.py:
   fewest waiting, then KV usage in 5 % steps, then fewest running; ties in turn);
2. placement by the proxy's own rule (proxy/placement.py `choose`, imported, not copied) over
   views built from the simulated state, with a step-time model fitted to the profile's steps
   by the proxy's own `StepCostModel`: `remote` (a prefill worker), `local` (the decode worker,
   in chunks capped by the rule) or `adaptive` (per request);
3. remote: decode-first reservation (blocks for prompt + output, or a FIFO wait for them),
   read by the decode worker once its step in progress ends (its loop reads control messages
   between steps: a long local prefill step delays the remote prompts behind it), the prefill
   worker's queue and steps (servers.py), the KV transfer (bytes / the profile's
   measured rate for the transport, one transfer at a time into each decode worker), then
   `remote_overhead_s` (hops; it delays the whole token stream, not the TPOT);
4. local: the decode worker's scheduler admits the prompt when blocks allow and prefills it in
   chunks beside its running batch (mixed steps); `local_overhead_s` delays its stream;
5. continuous-batching decode: one token per sequence per step, until the output length.

The placer's step-cost model: by default one fit of the profile's steps stands for every worker
(`fit_coefficients`). With `online_fits` each worker has its own `StepCostModel` (the proxy's,
with its window, recency and form search; its clock is the simulated time), first fed the steps
of the worker's start-up warm-up (warmup.py) and then every step the worker runs, delivered with
the heartbeat that carries it (every `HEARTBEAT_S`), so the simulated placer decides on what the
real one would know: few, recent, noisy samples of the worker's own steps. `step_noise` makes
each step's time a draw of a log-normal factor (median 1, that sigma) on the profile's model, as
serving steps scatter around it (2026-12-06, this 2-core VM: serving steps' p90 1.2-1.7x their
p50); `prefill_noise` the same for steps without decoding sequences (prefill steps scatter
less: sigma 0.10-0.13 against 0.19-0.24 for decode steps there); seeded (`noise_seed`), so a
run stays reproducible.

`corun` (workers pinned to cores of one CPU) multiplies a step's time by the factor for what the
other workers run as it starts (planner/profile.py `CoRun`, measured by `python -m
bench.corun_probe`); off by default.

Not modelled (say so when you compare): the proxy's own CPU time (tokenize, detokenize, HTTP),
preemption (reservations hold a request's longest KV, so none happens), the prefill workers' own
KV capacity (their batches are bounded by the token budget only), prefix-cache hits
across requests, and the placer's learned TTFT corrections unless `learn_corrections` is set
(then the rule sees them, learned from the simulated TTFTs, instead of the overheads given).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from planner.profile import CoRun, Profile, StepTimes
from planner.servers import DecodeServer, Job, PrefillServer, SimRequest, Step, kv_need
from planner.warmup import warmup_room, warmup_steps
from proxy.cost_model import Coefficients, StepCostModel
from proxy.placement import (
    DecodeView,
    Joiner,
    Placement,
    PrefillView,
    Slo,
    TransferView,
    choose,
    learn_overhead,
    prefill_seconds,
)

TRANSPORTS = ("stream", "frames", "nccl")
EWMA = 0.2  # the placer's running mean of finished output lengths (proxy/placer.py)
HEARTBEAT_S = 0.5  # a worker's heartbeat interval (worker/config.py): how steps reach the proxy


class SimulationError(ValueError):
    """A configuration or workload the simulator cannot run; the message says which part."""


@dataclass(frozen=True)
class ClusterSpec:
    num_prefill: int
    num_decode: int
    placement: str = "remote"  # remote | local | adaptive (colocated: num_prefill 0, local)
    slo_ttft_s: float = 1.0
    slo_tpot_s: float = 0.05
    transport: str = "stream"
    remote_overhead_s: float = 0.0
    local_overhead_s: float = 0.0
    kv_capacity_tokens: int = 0  # per decode worker; 0: the profile's
    transfer_gbps: float = 0.0  # KV transfer rate measured elsewhere (GB/s); 0: the profile's
    chunk_caps: bool = True  # False: local prompts take the whole token budget (a bare engine)
    # True: the rule sees the placer's learned TTFT corrections (proxy/placer.py: per placement,
    # from 0, a running mean of measured minus predicted TTFT), not the overheads above
    learn_corrections: bool = False
    online_fits: bool = False  # a cost model per worker, fitted online (see the module's text)
    warmup_s: float = 3.0  # the workers' --warmup-s: which warm-up rounds seed those models
    step_noise: float = 0.0  # sigma of a step's log-normal time factor (median 1), with decodes
    prefill_noise: float = 0.0  # the same for a step without decoding sequences
    noise_seed: int = 0
    # the workers share one host (a CPU's cores): a step's time x the factor for what the
    # others run when it starts (planner/profile.py CoRun); None: they share nothing
    corun: CoRun | None = None

    def __post_init__(self) -> None:
        if self.num_prefill < 0 or self.num_decode < 1:
            raise SimulationError(f"a cluster needs >= 1 decode and >= 0 prefill workers, got "
                                  f"{self.num_prefill}p{self.num_decode}d")
        if self.placement not in ("remote", "local", "adaptive"):
            raise SimulationError(f"placement must be remote, local or adaptive, "
                                  f"got {self.placement!r}")
        if self.transport not in TRANSPORTS:
            raise SimulationError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        Slo(self.slo_ttft_s, self.slo_tpot_s)
        if not (math.isfinite(self.warmup_s) and self.warmup_s >= 0):
            raise SimulationError(f"warmup_s must be 0 or more seconds, got {self.warmup_s}")
        for sigma in (self.step_noise, self.prefill_noise):
            if not (math.isfinite(sigma) and 0.0 <= sigma <= 2.0):
                raise SimulationError(f"step noise must be a sigma in [0, 2], got {sigma}")

    @property
    def is_noisy(self) -> bool:
        return bool(self.step_noise or self.prefill_noise)

    @property
    def is_colocated(self) -> bool:
        return self.num_prefill == 0

    @property
    def name(self) -> str:
        if self.is_colocated:
            return f"colocated-x{self.num_decode}"
        base = f"{self.num_prefill}p{self.num_decode}d"
        return base if self.placement == "remote" else f"{base}-{self.placement}"

    @property
    def num_devices(self) -> int:
        return self.num_prefill + self.num_decode


@dataclass(frozen=True)
class RequestOutcome:
    request: SimRequest
    placement: str
    first_token_s: float
    finish_s: float

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.request.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.request.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.request.output_tokens - 1)


def fit_coefficients(profile: Profile) -> Coefficients:
    """The proxy's step-time model fitted to the profile's steps, as heartbeats would feed it."""
    model = StepCostModel(window=4096, decay=1.0)
    for seconds, tokens, seqs, context in profile.steps or profile.synthetic_steps():
        model.observe(seconds, int(tokens), int(seqs), int(context))
    return model.coefficients


class Simulation:
    """One run: `Simulation(profile, spec).run(requests)` -> outcomes in request order."""

    def __init__(self, profile: Profile, spec: ClusterSpec,
                 times: StepTimes | None = None, coefficients: Coefficients | None = None) -> None:
        self.profile, self.spec = profile, spec
        self.times = times or StepTimes(profile)
        self.coef = coefficients or fit_coefficients(profile)
        limits = profile.engine
        self.budget = limits.max_num_batched_tokens
        capacity = spec.kv_capacity_tokens or limits.kv_capacity_tokens
        self.rng = random.Random(spec.noise_seed)
        noise = self._noise if spec.is_noisy else None
        self.prefills = [PrefillServer(self.times, self.budget, noise, self._shared(i))
                         for i in range(spec.num_prefill)]
        self.decodes = [DecodeServer(self.times, self.budget, limits.max_num_seqs, capacity,
                                     limits.block_size, noise,
                                     self._shared(spec.num_prefill + d))
                        for d in range(spec.num_decode)]
        # online fits: prefill workers' models, then decode workers'; steps not yet delivered
        self.now = 0.0
        self.models: list[StepCostModel] = []
        self.undelivered: list[deque[tuple[float, Step]]] = []
        if spec.online_fits:
            room = warmup_room(limits.max_model_len, capacity)
            for _ in range(spec.num_prefill + spec.num_decode):
                model = StepCostModel(clock=lambda: self.now)
                for step in warmup_steps(self.times, self.budget, room, noise or (lambda _: 1.0),
                                         spec.warmup_s):
                    model.observe(*step)
                self.models.append(model)
                self.undelivered.append(deque())
        self.mode = Placement.LOCAL if spec.is_colocated else Placement(spec.placement)
        self.slo = Slo(spec.slo_ttft_s, spec.slo_tpot_s)
        if not spec.is_colocated and not spec.transfer_gbps:
            self.times.transfer_s(spec.transport, 1.0)  # fails now, naming what was measured
        self.rate = self._transfer_rate()
        self.link_free = [0.0] * spec.num_decode
        self.events: list[tuple[float, int, int, int]] = []
        self.seq = itertools.count()
        self.num_routed = 0
        self.output_len = 64.0
        self.jobs: list[Job] = []
        self.remote_pending: list[list[Job]] = [[] for _ in range(spec.num_decode)]
        self.corrections = {"remote": 0.0, "local": 0.0}

    def run(self, requests: Sequence[SimRequest]) -> list[RequestOutcome]:
        capacity = self.decodes[0].capacity
        for i, r in enumerate(requests):
            if kv_need(r, self.profile.engine.block_size) > capacity:
                raise SimulationError(f"request {i} needs {r.prompt_tokens + r.output_tokens} "
                                      f"tokens of KV, more than a decode worker holds "
                                      f"({capacity}; --kv-capacity-tokens)")
            self.jobs.append(Job(i, r))
            self._push(r.arrival_s, 0, i)
        while self.events:
            now, _, kind, index = heapq.heappop(self.events)
            (self._arrive, self._prefill_end, self._kv_landed, self._decode_end,
             self._reserve)[kind](now, index)
        unfinished = [j.index for j in self.jobs if j.finish_s is None]
        if unfinished:
            raise SimulationError(f"{len(unfinished)} requests never finished (first: "
                                  f"{unfinished[0]}): a bug in the simulator")
        delay = {"remote": self.spec.remote_overhead_s, "local": self.spec.local_overhead_s}
        return [RequestOutcome(j.request, j.placement, float(j.first_token_s or 0.0)
                               + delay[j.placement], float(j.finish_s or 0.0)
                               + delay[j.placement]) for j in self.jobs]

    # ---- events ----------------------------------------------------------------------------
    def _push(self, at: float, kind: int, index: int) -> None:
        heapq.heappush(self.events, (at, next(self.seq), kind, index))

    def _arrive(self, now: float, index: int) -> None:
        self._deliver(now)
        job = self.jobs[index]
        job.decode = self._route()
        decode = self.decodes[job.decode]
        prediction = choose(self.mode, job.request.prompt_tokens, self._prefill_views(now),
                            self._decode_view(job.decode, now), self._transfer_view(), self.slo)
        job.expected_first_s = now + prediction.ttft_s
        if prediction.placement is Placement.LOCAL:
            job.placement = "local"
            job.chunk_cap = prediction.chunk if self.spec.chunk_caps else 0
            decode.waiting.append(job)
            self._kick_decode(now, job.decode)
            return
        job.prefill = int(prediction.prefill_id or 0)
        self.remote_pending[job.decode].append(job)
        if decode.is_busy:  # the worker reads its Reserve once the step in progress ends
            self._push(decode.step_end_s, 4, index)
        else:
            self._reserve(now, index)

    def _reserve(self, now: float, index: int) -> None:
        job = self.jobs[index]
        if self.decodes[job.decode].reserve_or_queue(job):
            self._to_prefill(now, job)

    def _to_prefill(self, now: float, job: Job) -> None:
        self.prefills[job.prefill].queue.append(job)
        self._kick_prefill(now, job.prefill)

    def _prefill_end(self, now: float, p: int) -> None:
        self._report(now, p, self.prefills[p].last_step)
        for job in self.prefills[p].finish_step():
            nbytes = job.request.prompt_tokens * self.profile.kv_bytes_per_token
            start = max(now, self.link_free[job.decode])
            self.link_free[job.decode] = start + self._transfer_s(nbytes)
            self._push(self.link_free[job.decode], 2, job.index)
        self._kick_prefill(now, p)

    def _kv_landed(self, now: float, index: int) -> None:
        job = self.jobs[index]
        job.num_generated, job.first_token_s = 1, now
        self._learn(job)
        decode = self.decodes[job.decode]
        if job.request.output_tokens <= 1:
            job.finish_s = job.first_token_s
            self._finished(now, job)
            return
        decode.inbound.append(job)
        self._kick_decode(now, job.decode)

    def _decode_end(self, now: float, d: int) -> None:
        self._report(now, self.spec.num_prefill + d, self.decodes[d].last_step)
        first, finished = self.decodes[d].finish_step(now)
        for job in first:
            self._learn(job)
        for job in finished:
            self._finished(now, job)
        self._kick_decode(now, d)

    def _learn(self, job: Job) -> None:
        """The placer's correction on a first token (proxy/placer.py `on_tokens`)."""
        delay = (self.spec.remote_overhead_s if job.placement == "remote"
                 else self.spec.local_overhead_s)
        error = (job.first_token_s or 0.0) + delay - job.expected_first_s
        self.corrections[job.placement] = learn_overhead(self.corrections[job.placement], error,
                                                         self.slo)

    def _finished(self, now: float, job: Job) -> None:
        self.output_len += EWMA * (job.request.output_tokens - self.output_len)
        for granted in self.decodes[job.decode].release(job):
            self._to_prefill(now, granted)

    def _kick_prefill(self, now: float, p: int) -> None:
        seconds = self.prefills[p].start_step(now)
        if seconds is not None:
            self._push(now + seconds, 1, p)

    def _kick_decode(self, now: float, d: int) -> None:
        seconds = self.decodes[d].start_step(now)
        if seconds is not None:
            self._push(now + seconds, 3, d)

    # ---- the placer's cost models ----------------------------------------------------------
    def _noise(self, decode_seqs: int) -> float:
        sigma = self.spec.step_noise if decode_seqs else self.spec.prefill_noise
        return math.exp(self.rng.gauss(0.0, sigma)) if sigma else 1.0

    def _shared(self, worker: int) -> Callable[[bool], float] | None:
        """Worker `worker`'s co-run factor (prefill workers first): by what the busiest of the
        others runs as its step starts (a step with prefill tokens is heavy)."""
        corun = self.spec.corun
        if corun is None:
            return None

        def factor(heavy: bool) -> float:
            others = [True for i, p in enumerate(self.prefills) if i != worker and p.batch]
            others += [d.last_step[1] > 0 for i, d in enumerate(self.decodes)
                       if i + self.spec.num_prefill != worker and d.is_busy]
            return max((corun.factor(heavy, o) for o in others), default=1.0)
        return factor

    def _report(self, now: float, worker: int, step: Step) -> None:
        """A step that ended at `now` reaches the proxy with the worker's next heartbeat."""
        if self.models:
            due = math.ceil(now / HEARTBEAT_S - 1e-9) * HEARTBEAT_S
            self.undelivered[worker].append((due, step))

    def _deliver(self, now: float) -> None:
        self.now = now
        for model, steps in zip(self.models, self.undelivered, strict=True):
            while steps and steps[0][0] <= now:
                model.observe(*steps.popleft()[1])

    def _coef(self, worker: int) -> Coefficients:
        """Worker `worker`'s step-cost fit as the placer sees it (prefill workers first)."""
        return self.models[worker].coefficients if self.models else self.coef

    # ---- routing and the placement rule's views ----------------------------------------------
    def _route(self) -> int:
        def score(d: DecodeServer) -> tuple[int, int, int]:
            usage = d.kv_used / d.capacity
            return (len(d.waiting) + len(d.reserve_queue), math.floor(usage / 0.05 + 1e-9),
                    len(d.running) + len(d.inbound))
        best = min(score(d) for d in self.decodes)
        tied = [i for i, d in enumerate(self.decodes) if score(d) == best]
        self.num_routed += 1
        return tied[(self.num_routed - 1) % len(tied)]

    def _prefill_views(self, now: float) -> list[PrefillView]:
        views = []
        for i, p in enumerate(self.prefills):
            coef = self._coef(i)
            busy = max(0.0, p.busy_until - now) if p.batch else 0.0
            views.append(PrefillView(str(i), coef, busy + prefill_seconds(
                coef, p.queued_tokens(), self.budget), 0, self.budget))
        return views

    def _decode_view(self, d: int, now: float) -> DecodeView:
        server = self.decodes[d]
        coef = self._coef(self.spec.num_prefill + d)
        running = server.running + server.inbound
        local = server.prefilling + list(server.waiting)
        local_tokens = sum(j.num_uncomputed for j in local)
        chunk = min((j.chunk_cap for j in local if j.chunk_cap), default=0)
        context = sum(j.context for j in running)
        local_s = prefill_seconds(coef, local_tokens, chunk or self.budget, len(running),
                                  context)
        # remote prompts routed here whose KV has not landed, when the rule predicted it would
        # (local ones are in `local_s`; proxy/placer.py builds the same view)
        pending = [j for j in self.remote_pending[d] if j.first_token_s is None]
        self.remote_pending[d] = pending  # landed ones leave: the scan stays short
        expected = [j for j in pending if j.expected_first_s > 0.0]
        joining = tuple(Joiner(max(0.0, j.expected_first_s - now), j.request.prompt_tokens,
                               j.expected_first_s - j.request.arrival_s) for j in expected)
        # the output a stall is spread over: the running and joining sequences' expected
        # lengths (capped by what they will make, the simulator's max_tokens)
        lengths = [max(1.0, min(float(j.request.output_tokens),
                                max(self.output_len, 2.0 * j.num_generated)))
                   for j in running + expected]
        horizon = sum(lengths) / len(lengths) if lengths else self.output_len
        return DecodeView(str(d), coef, len(running), context, local_s, chunk, 0,
                          self.budget, horizon, joining)

    def _transfer_view(self) -> TransferView:
        if self.spec.learn_corrections:
            return TransferView(self.profile.kv_bytes_per_token, self.rate,
                                self.corrections["remote"], self.corrections["local"])
        return TransferView(self.profile.kv_bytes_per_token, self.rate,
                            self.spec.remote_overhead_s, self.spec.local_overhead_s)

    def _transfer_s(self, nbytes: float) -> float:
        if self.spec.transfer_gbps:
            return nbytes / (self.spec.transfer_gbps * 1e9)
        return self.times.transfer_s(self.spec.transport, nbytes)

    def _transfer_rate(self) -> float:
        if self.spec.transfer_gbps:
            return self.spec.transfer_gbps * 1e9
        rows = self.profile.transfers.get(self.spec.transport)
        if not isinstance(rows, list) or not rows:
            return 1e9
        nbytes, seconds = max(rows, key=lambda r: r[0])
        return nbytes / max(seconds, 1e-9)


def simulate(profile: Profile, spec: ClusterSpec, requests: Sequence[SimRequest],
             times: StepTimes | None = None) -> list[RequestOutcome]:
    return Simulation(profile, spec, times).run(requests)
