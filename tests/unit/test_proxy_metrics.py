"""Prometheus metrics (proxy/metrics.py): names, values, and a parseable exposition."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import ProxyMetrics


def samples(metrics: ProxyMetrics) -> dict[tuple[str, tuple], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def test_render_parses_and_has_every_name() -> None:
    metrics = ProxyMetrics()
    metrics.on_first_token(0.12)
    metrics.on_inter_token(0.02)
    metrics.on_inter_token(0.09, num_tokens=3)
    metrics.on_request_finished("stop", num_prompt_tokens=40, num_generation_tokens=11,
                                e2e_s=1.12, ttft_s=0.12, num_cached_tokens=32)
    metrics.on_request_failed("worker_lost", num_generation_tokens=2)
    metrics.on_kv_transfer(23040 * 40, 0.004)
    metrics.on_preemptions(2)
    metrics.set_request_counts(num_running=3, num_waiting=1)
    metrics.set_worker("decode-0", "decode", True, kv_usage=0.25, num_used_blocks=12)
    metrics.set_worker("prefill-0", "prefill", False)
    got = samples(metrics)
    expected = {
        ("pdserve:prompt_tokens_total", ()): 40,
        ("pdserve:generation_tokens_total", ()): 13,
        ("pdserve:request_success_total", (("finished_reason", "stop"),)): 1,
        ("pdserve:request_failure_total", (("kind", "worker_lost"),)): 1,
        ("pdserve:kv_transfer_bytes_total", ()): 23040 * 40,
        ("pdserve:kv_transfer_seconds_total", ()): 0.004,
        ("pdserve:num_preemptions_total", ()): 2,
        ("pdserve:prefix_cache_hits_total", ()): 32,
        ("pdserve:prefix_cache_queries_total", ()): 40,
        ("pdserve:num_requests_running", ()): 3,
        ("pdserve:num_requests_waiting", ()): 1,
        ("pdserve:kv_cache_usage_perc", (("worker", "decode-0"),)): 0.25,
        ("pdserve:kv_cache_used_blocks", (("worker", "decode-0"),)): 12,
        ("pdserve:worker_up", (("role", "decode"), ("worker", "decode-0"))): 1,
        ("pdserve:worker_up", (("role", "prefill"), ("worker", "prefill-0"))): 0,
        ("pdserve:time_to_first_token_seconds_count", ()): 1,
        ("pdserve:inter_token_latency_seconds_count", ()): 4,
        ("pdserve:time_per_output_token_seconds_count", ()): 1,
        ("pdserve:e2e_request_latency_seconds_count", ()): 1,
    }
    for key, value in expected.items():
        assert abs(got[key] - value) < 1e-9, key
    assert abs(got[("pdserve:time_per_output_token_seconds_sum", ())] - 0.1) < 1e-9
    assert abs(got[("pdserve:inter_token_latency_seconds_sum", ())] - 0.11) < 1e-9


def test_instances_are_independent() -> None:
    first, second = ProxyMetrics(), ProxyMetrics()  # no duplicate-registration error
    first.on_preemptions(5)
    assert samples(second)[("pdserve:num_preemptions_total", ())] == 0


def test_counters_never_go_negative_and_workers_can_leave() -> None:
    metrics = ProxyMetrics()
    metrics.on_prefix_cache(num_queried_tokens=10, num_hit_tokens=-3)
    metrics.on_prefix_cache(num_queried_tokens=10, num_hit_tokens=99)  # clamped to queried
    metrics.set_request_counts(-1, -2)
    metrics.set_worker("d1", "decode", True, kv_usage=1.7, num_used_blocks=-4)
    got = samples(metrics)
    assert got[("pdserve:prefix_cache_hits_total", ())] == 10
    assert got[("pdserve:num_requests_running", ())] == 0
    assert got[("pdserve:kv_cache_usage_perc", (("worker", "d1"),))] == 1.0
    assert got[("pdserve:kv_cache_used_blocks", (("worker", "d1"),))] == 0
    metrics.remove_worker("d1", "decode")
    metrics.remove_worker("never-seen", "prefill")
    assert not any(name == "pdserve:worker_up" for name, _ in samples(metrics))
