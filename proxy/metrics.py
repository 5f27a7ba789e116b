"""Prometheus metrics of the serving system, exposed by the proxy at `GET /metrics`.

Owns `ProxyMetrics`: one `CollectorRegistry` per instance (nothing global, so tests and several
proxies in one process never collide) holding the `pdserve:` series — latency histograms,
token / request / transfer counters, and per-worker gauges fed from worker status reports.
Names follow vLLM's (`vllm:time_to_first_token_seconds` -> `pdserve:time_to_first_token_seconds`).
It never measures anything itself: the request lifecycle and the worker monitor call it.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds. Wide enough for a CPU-only run (slow) and a GPU run (fast).
TTFT_ERROR_BUCKETS = (-10.0, -5.0, -2.0, -1.0, -0.5, -0.25, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05,
                      0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                         0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ProxyMetrics:
    """All `pdserve:` metrics; call the `on_*` / `set_*` methods, serve `render()`.

    Conventions: `finished_reason` is "stop", "length" or "abort"; failure `kind` is a short
    word such as "timeout", "worker_lost", "overloaded", "invalid", "internal"; `kv_usage` is a
    fraction in [0, 1] (as vLLM's `kv_cache_usage_perc`).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_token = Histogram(
            "pdserve:time_to_first_token_seconds", "Time from request arrival to first token.",
            buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "pdserve:inter_token_latency_seconds", "Time between consecutive output tokens.",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "pdserve:time_per_output_token_seconds",
            "Per request: (e2e latency - time to first token) / (output tokens - 1).",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "pdserve:e2e_request_latency_seconds", "Time from request arrival to its end.",
            buckets=E2E_BUCKETS, registry=r)
        self._init_counters()
        self._init_gauges()

    def _init_counters(self) -> None:
        r = self.registry
        # prometheus_client appends `_total` to counter names.
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens processed.",
                                     registry=r)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated.",
                                         registry=r)
        self.request_success = Counter("pdserve:request_success", "Requests finished.",
                                       ["finished_reason"], registry=r)
        self.request_failure = Counter("pdserve:request_failure", "Requests failed.",
                                       ["kind"], registry=r)
        self.kv_transfer_bytes = Counter("pdserve:kv_transfer_bytes",
                                         "KV cache bytes moved prefill -> decode.", registry=r)
        self.kv_transfer_seconds = Counter("pdserve:kv_transfer_seconds",
                                           "Seconds spent moving KV cache.", registry=r)
        self.num_preemptions = Counter("pdserve:num_preemptions",
                                       "Decode preemptions (blocks ran out).", registry=r)
        self.prefix_cache_hits = Counter("pdserve:prefix_cache_hits",
                                         "Prompt tokens served from the prefix cache.",
                                         registry=r)
        self.prefix_cache_queries = Counter("pdserve:prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.",
                                            registry=r)
        self.prefill_placement = Counter("pdserve:prefill_placement",
                                         "Requests by where their prompt was prefilled.",
                                         ["placement"], registry=r)
        self.rejected_messages = Counter(
            "pdserve:rejected_messages",
            "Messages, frames or connections refused before a handler, by component, plane and "
            "reason (workers' totals arrive with their heartbeats).",
            ["component", "plane", "reason"], registry=r)
        self.ttft_prediction_error = Histogram(
            "pdserve:ttft_prediction_error_seconds",
            "Placement's predicted minus measured time to first token.",
            buckets=TTFT_ERROR_BUCKETS, registry=r)

    def _init_gauges(self) -> None:
        r = self.registry
        self.num_requests_running = Gauge("pdserve:num_requests_running",
                                          "Requests generating on decode workers.", registry=r)
        self.num_requests_waiting = Gauge("pdserve:num_requests_waiting",
                                          "Requests queued for a decode reservation.",
                                          registry=r)
        self.kv_cache_usage = Gauge("pdserve:kv_cache_usage_perc",
                                    "Fraction of a worker's KV blocks in use (0..1).",
                                    ["worker"], registry=r)
        self.kv_cache_used_blocks = Gauge("pdserve:kv_cache_used_blocks",
                                          "KV blocks in use on a worker (0 when idle).",
                                          ["worker"], registry=r)
        self.worker_up = Gauge("pdserve:worker_up", "1 if the worker answers, else 0.",
                               ["worker", "role"], registry=r)

    # ------------------------------------------------------------------ per request

    def on_first_token(self, ttft_s: float) -> None:
        self.time_to_first_token.observe(ttft_s)

    def on_inter_token(self, gap_s: float, num_tokens: int = 1) -> None:
        """`num_tokens` arrived together `gap_s` after the previous ones: each waited gap/n."""
        for _ in range(max(num_tokens, 1)):
            self.inter_token_latency.observe(gap_s / max(num_tokens, 1))

    def on_request_finished(
        self,
        finished_reason: str,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        e2e_s: float,
        ttft_s: float | None = None,
        num_cached_tokens: int | None = None,
    ) -> None:
        """A request ended normally; `num_cached_tokens` None = prefix cache not consulted."""
        self.request_success.labels(finished_reason).inc()
        self.prompt_tokens.inc(max(num_prompt_tokens, 0))
        self.generation_tokens.inc(max(num_generation_tokens, 0))
        self.e2e_request_latency.observe(e2e_s)
        if ttft_s is not None and num_generation_tokens > 1:
            self.time_per_output_token.observe(
                max(e2e_s - ttft_s, 0.0) / (num_generation_tokens - 1))
        if num_cached_tokens is not None:
            self.on_prefix_cache(num_prompt_tokens, num_cached_tokens)

    def on_request_failed(self, kind: str, num_generation_tokens: int = 0) -> None:
        self.request_failure.labels(kind).inc()
        self.generation_tokens.inc(max(num_generation_tokens, 0))

    def on_prefix_cache(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries.inc(max(num_queried_tokens, 0))
        self.prefix_cache_hits.inc(min(max(num_hit_tokens, 0), max(num_queried_tokens, 0)))

    # ------------------------------------------------------------------ workers

    def on_kv_transfer(self, num_bytes: int, seconds: float) -> None:
        self.kv_transfer_bytes.inc(max(num_bytes, 0))
        self.kv_transfer_seconds.inc(max(seconds, 0.0))

    def on_placement(self, placement: str) -> None:
        self.prefill_placement.labels(placement=placement).inc()

    def on_ttft_prediction_error(self, seconds: float) -> None:
        """Predicted minus measured TTFT of one request (negative: it took longer)."""
        self.ttft_prediction_error.observe(seconds)

    def on_rejected(self, component: str, plane: str, reason: str, n: int = 1) -> None:
        if n > 0:
            self.rejected_messages.labels(component, plane, reason).inc(n)

    def on_preemptions(self, num_preemptions: int) -> None:
        self.num_preemptions.inc(max(num_preemptions, 0))

    def set_request_counts(self, num_running: int, num_waiting: int) -> None:
        self.num_requests_running.set(max(num_running, 0))
        self.num_requests_waiting.set(max(num_waiting, 0))

    def set_worker(
        self,
        worker_id: str,
        role: str,
        is_alive: bool,
        kv_usage: float | None = None,
        num_used_blocks: int | None = None,
    ) -> None:
        """The latest status of one worker (None leaves a gauge as it was)."""
        self.worker_up.labels(worker_id, role).set(1 if is_alive else 0)
        if kv_usage is not None:
            self.kv_cache_usage.labels(worker_id).set(min(max(kv_usage, 0.0), 1.0))
        if num_used_blocks is not None:
            self.kv_cache_used_blocks.labels(worker_id).set(max(num_used_blocks, 0))

    def remove_worker(self, worker_id: str, role: str) -> None:
        """Drop a worker's series (it left the deployment for good)."""
        for gauge, labels in ((self.worker_up, (worker_id, role)),
                              (self.kv_cache_usage, (worker_id,)),
                              (self.kv_cache_used_blocks, (worker_id,))):
            with contextlib.suppress(KeyError):  # never reported that series
                gauge.remove(*labels)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for the `/metrics` response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
