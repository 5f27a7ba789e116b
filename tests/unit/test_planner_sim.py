"""The planner's simulator against numbers that can be checked by hand: one request alone
takes exactly the profile's step times, and a single prefill server with deterministic service
behaves as an M/D/1 queue (Pollaczek-Khinchine mean wait)."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import pytest

from planner.profile import Profile, ProfileError, StepTimes
from planner.servers import SimRequest
from planner.simulator import ClusterSpec, Simulation, SimulationError, simulate
from tests.unit.planner_fixtures import KV_BYTES, small_profile


def test_one_remote_request_takes_the_profiles_times() -> None:
    profile = small_profile()
    (out,) = simulate(profile, ClusterSpec(1, 1), [SimRequest(0.5, 1024, 10)])
    transfer = 1024 * KV_BYTES / 1e9
    assert out.placement == "remote"
    assert out.ttft_s == pytest.approx(1.024 + transfer, rel=1e-9)
    assert out.tpot_s == pytest.approx(0.02, rel=1e-9)  # decode at batch 1, flat in context


def test_one_colocated_request_takes_the_profiles_times() -> None:
    profile = small_profile()
    spec = ClusterSpec(0, 1, "local", local_overhead_s=0.003)
    (out,) = simulate(profile, spec, [SimRequest(0.0, 256, 5)])
    assert out.placement == "local"
    assert out.ttft_s == pytest.approx(0.256 + 0.003, rel=1e-9)
    assert out.tpot_s == pytest.approx(0.02, rel=1e-9)


def test_overheads_and_measured_rate_override() -> None:
    spec = ClusterSpec(1, 1, remote_overhead_s=0.01, transfer_gbps=0.5)
    (out,) = simulate(small_profile(), spec, [SimRequest(0.0, 256, 1)])
    assert out.ttft_s == pytest.approx(0.256 + 256 * KV_BYTES / 0.5e9 + 0.01, rel=1e-9)
    assert out.tpot_s is None


def test_a_step_overhead_is_added_to_every_step_once() -> None:
    times = StepTimes(small_profile(), step_overhead_s=0.005)
    assert times.step_s(256, 0, 0, 0) == pytest.approx(0.256 + 0.005)
    assert times.step_s(0, 0, 8, 8 * 128) == pytest.approx(0.03 + 0.005)
    assert times.step_s(256, 0, 8, 8 * 512) == pytest.approx(0.276 + 0.005)
    assert times.step_s(0, 0, 0, 0) == 0.0
    (out,) = simulate(small_profile(), ClusterSpec(1, 1), [SimRequest(0.5, 1024, 10)], times)
    assert out.tpot_s == pytest.approx(0.025, rel=1e-9)
    with pytest.raises(ProfileError, match="step overhead"):
        StepTimes(small_profile(), step_overhead_s=-1.0)


def test_step_times_interpolate_and_mix() -> None:
    times = StepTimes(small_profile())
    assert times.prefill_s(512) == pytest.approx(0.512)
    assert times.decode_s(8, 128) == pytest.approx(0.03)
    assert times.decode_s(36, 128) == pytest.approx(0.055)  # halfway between 8 and 64
    # the mixed point: 0.256 + 0.03x = 0.276 with decode(8, 512) -> overlap of the shorter
    d = times.decode_s(8, 512)
    assert times.overlap == pytest.approx((0.256 + d - 0.276) / d)
    assert times.step_s(256, 0, 8, 8 * 512) == pytest.approx(0.276)
    assert times.mixed_extra_s == 0.0


def test_a_mixed_step_dearer_than_its_parts_in_every_row_costs_the_excess() -> None:
    """A GPU's mixed steps run eagerly while its decode steps replay CUDA graphs: every mixed
    row of an H100 profile cost 7-10 ms more than its two parts. Such rows give an extra cost
    (their median excess) instead of an overlap; one row below its parts keeps the overlap."""
    base = StepTimes(small_profile())
    parts = [(b, ctx, chunk, max(base.prefill_s(chunk) - base.prefill_fixed_s, 0.0)
              + base.decode_s(b, ctx)) for b, ctx, chunk in ((1, 512, 256), (8, 512, 1024),
                                                             (64, 512, 256))]
    mixed = [[b, ctx, chunk, s + e] for (b, ctx, chunk, s), e in
             zip(parts, (0.008, 0.010, 0.009), strict=True)]
    profile = dataclasses.replace(small_profile(), mixed=mixed)
    times = StepTimes(profile)
    assert times.overlap == 0.0 and times.mixed_extra_s == pytest.approx(0.009)
    # (the 256-token rows' median measured / modelled then corrects it by their own spread)
    assert times.step_s(256, 0, 1, 512) == pytest.approx(parts[0][3] + 0.009, rel=0.01)
    mixed[1][3] = parts[1][3] - 0.05  # this one hid 50 ms of its decode
    times = StepTimes(dataclasses.replace(profile, mixed=mixed))
    assert times.mixed_extra_s == 0.0  # (the median share hidden is still below 0: none)
    assert times.overlap == 0.0


def test_md1_queue_matches_pollaczek_khinchine() -> None:
    """Prompts of 100 tokens, a budget of 100 tokens (one prompt per step: service D = 0.1 s),
    Poisson arrivals at rho = 0.5, one output token: the mean wait before service must be
    rho * D / (2 (1 - rho)) within 2 %."""
    profile = small_profile(max_num_batched_tokens=100, capacity=10**9, max_num_seqs=10**6)
    service, rho = StepTimes(profile).prefill_s(100), 0.5
    rate = rho / service
    rng = random.Random(7)
    t, reqs = 0.0, []
    for _ in range(40_000):
        t += rng.expovariate(rate)
        reqs.append(SimRequest(t, 100, 1))
    spec = ClusterSpec(1, 1, "remote", transfer_gbps=1e9)  # transfer ~0
    outs = simulate(profile, spec, reqs)
    mean_wait = sum(o.ttft_s - service for o in outs) / len(outs)
    expected = rho * service / (2 * (1 - rho))
    assert mean_wait == pytest.approx(expected, rel=0.02, abs=1e-4)


def test_bad_inputs_are_typed_errors_naming_the_part() -> None:
    with pytest.raises(SimulationError, match="KV"):
        simulate(small_profile(capacity=512), ClusterSpec(1, 1), [SimRequest(0, 1000, 8)])
    with pytest.raises(SimulationError, match="placement"):
        ClusterSpec(1, 1, "nowhere")
    with pytest.raises(SimulationError, match="warmup_s"):
        ClusterSpec(1, 1, warmup_s=-1.0)
    with pytest.raises(ProfileError, match="frames"):
        simulate(small_profile(), ClusterSpec(1, 1, transport="frames"), [SimRequest(0, 8, 2)])
    with pytest.raises(ProfileError, match="decode"):
        Profile.from_json('{"version": 1, "engine": {"max_num_batched_tokens": 8, '
                          '"max_num_seqs": 1, "block_size": 16, "kv_capacity_tokens": 64, '
                          '"max_model_len": 64}, "kv_bytes_per_token": 1, '
                          '"prefill": [[1, 0.1]], "decode": []}')
    with pytest.raises(ProfileError, match="version"):
        Profile.from_json('{"version": 7}')


def test_profile_round_trips_through_json() -> None:
    profile = small_profile()
    assert Profile.from_json(profile.to_json()) == profile


def test_the_planner_imports_no_torch_numpy_or_zmq() -> None:
    code = ("import sys; import planner.search, planner.report, planner.simulator; "
            "heavy = sorted(m for m in ('torch', 'numpy', 'zmq') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"importing the planner pulled in {out.stdout}{out.stderr}"


def test_decode_first_reservation_queues_for_kv() -> None:
    """A decode worker holding KV for one request only: the second waits for the first to
    finish before its prefill may start (no prefill work without a landing place)."""
    profile = small_profile(capacity=400)
    first, second = simulate(profile, ClusterSpec(1, 1), [SimRequest(0.0, 256, 20),
                                                          SimRequest(0.0, 256, 20)])
    assert second.first_token_s >= first.finish_s + 0.256
    assert first.ttft_s == pytest.approx(0.256 + 256 * KV_BYTES / 1e9)


def test_adaptive_placement_uses_the_proxys_rule() -> None:
    """With costly hops to a prefill worker, the proxy's rule (proxy/placement.py) keeps short
    prompts on the decode worker; with free hops a long prompt goes remote."""
    short = simulate(small_profile(), ClusterSpec(1, 1, "adaptive", remote_overhead_s=0.5),
                     [SimRequest(0.0, 32, 4)])
    assert short[0].placement == "local"
    long_ = simulate(small_profile(), ClusterSpec(1, 1, "adaptive", slo_tpot_s=0.03),
                     [SimRequest(0.0, 64, 200), SimRequest(0.5, 2000, 4)])
    assert long_[1].placement == "remote"


def test_colocated_replicas_share_the_load() -> None:
    """Two colocated replicas at the same time serve two prompts in parallel (the router
    spreads them), one replica one after the other."""
    reqs = [SimRequest(0.0, 1024, 2), SimRequest(0.0, 1024, 2)]
    two = simulate(small_profile(), ClusterSpec(0, 2, "local"), reqs)
    one = simulate(small_profile(), ClusterSpec(0, 1, "local"), reqs)
    assert max(o.ttft_s for o in two) == pytest.approx(1.024, rel=0.01)
    assert max(o.ttft_s for o in one) > 1.5


def test_noisy_dips_do_not_make_bigger_steps_faster() -> None:
    """A profile taken on a busy machine may time batch 8 faster than batch 1; the model keeps
    step time non-decreasing in context and tokens, and no batch faster than the smallest,
    instead of extrapolating the dip."""
    profile = small_profile()
    noisy = Profile(profile.engine, profile.kv_bytes_per_token,
                    prefill=[[16, 0.5], [64, 0.2], [256, 0.3]],
                    decode=[[1, 128, 0.5], [8, 128, 0.3], [16, 128, 0.2]],
                    transfers=profile.transfers)
    times = StepTimes(noisy)
    assert times.decode_s(32, 128) >= times.decode_s(1, 128) == pytest.approx(0.5)
    assert times.prefill_s(1024) >= times.prefill_s(16) == pytest.approx(0.5)


def test_a_measured_dip_over_the_batch_is_kept() -> None:
    """This CPU times a batch of 4 below a batch of 3 in every profile and every serving log
    (2026-12-06: 109-112 ms vs 136-143 ms at batch 4 and 3 while serving); the model follows the
    measured batches, not an envelope over them."""
    profile = small_profile()
    rows = [[1, 128, 0.07], [2, 128, 0.10], [3, 128, 0.13], [4, 128, 0.105], [8, 128, 0.15]]
    times = StepTimes(Profile(profile.engine, profile.kv_bytes_per_token,
                              prefill=profile.prefill, decode=rows, transfers=profile.transfers))
    assert times.decode_s(3, 128) == pytest.approx(0.13)
    assert times.decode_s(4, 128) == pytest.approx(0.105)
    assert times.decode_s(6, 128) == pytest.approx(0.1275)  # between the measured 4 and 8


def test_a_reserve_waits_for_the_decode_workers_step_in_progress() -> None:
    """The decode worker reads control messages between steps: request 1 arrives 4 ms into the
    second 20 ms decode step of request 0, so its prefill starts 16 ms later than on an idle
    worker."""
    first, second = simulate(small_profile(), ClusterSpec(1, 1),
                             [SimRequest(0.0, 16, 50), SimRequest(0.040, 16, 2)])
    step_end = first.first_token_s + 2 * 0.02  # request 0's KV landed, then two steps
    assert second.ttft_s == pytest.approx(step_end - 0.040 + 0.016 + 16 * KV_BYTES / 1e9,
                                          rel=1e-6)


def test_learned_corrections_start_at_zero_and_follow_the_hops() -> None:
    spec = ClusterSpec(1, 1, remote_overhead_s=0.3, learn_corrections=True)
    sim = Simulation(small_profile(), spec)
    sim.run([SimRequest(float(i), 64, 2) for i in range(20)])
    assert 0.25 < sim.corrections["remote"] <= 0.3 and sim.corrections["local"] == 0.0


def test_a_mixed_step_follows_what_its_chunk_size_measured() -> None:
    """This CPU's 16-token chunk beside one decoding sequence took a third more than one overlap
    fitted over bigger chunks gives (2026-12-07): the mixed rows of each chunk size correct the
    model at that size, interpolated between sizes and flat beyond them."""
    base = StepTimes(small_profile())
    parts = {chunk: base.step_s(chunk, 0, 8, 8 * 512) for chunk in (16, 256)}
    mixed = [[8, 512, 16, 1.4 * parts[16]], [8, 512, 256, parts[256]]]
    times = StepTimes(dataclasses.replace(small_profile(), mixed=mixed))
    model = {c: times._mixed_s(times.prefill_s(c), times.decode_s(8, 512)) for c in (16, 256)}
    assert times.step_s(16, 0, 8, 8 * 512) == pytest.approx(mixed[0][3])
    assert times.step_s(256, 0, 8, 8 * 512) == pytest.approx(mixed[1][3])
    r16, r256 = mixed[0][3] / model[16], mixed[1][3] / model[256]
    mid = times.step_s(136, 0, 8, 8 * 512) / times._mixed_s(times.prefill_s(136),
                                                             times.decode_s(8, 512))
    assert mid == pytest.approx((r16 + r256) / 2)  # halfway between the two sizes
    assert times.step_s(8, 0, 8, 8 * 512) == pytest.approx(
        r16 * times._mixed_s(times.prefill_s(8), times.decode_s(8, 512)))  # flat below 16
    # a profile without mixed rows keeps the plain model
    plain = StepTimes(dataclasses.replace(small_profile(), mixed=[]))
    assert plain.step_s(64, 0, 8, 8 * 512) == pytest.approx(
        plain._mixed_s(plain.prefill_s(64), plain.decode_s(8, 512)))


def test_a_prefill_workers_queue_leaves_out_the_step_in_progress() -> None:
    """The placer's view of a prefill worker is the rest of its step in progress plus the tokens
    after it: the step's own tokens counted again made a busy worker look a whole prompt longer
    (adaptive then placed locally what the proxy placed remote, 2026-12-07)."""
    from planner.servers import Job, PrefillServer

    server = PrefillServer(StepTimes(small_profile()), budget=512)
    server.queue.extend([Job(0, SimRequest(0.0, 1000, 4)), Job(1, SimRequest(0.0, 300, 4))])
    assert server.queued_tokens() == 1300  # idle: everything waits
    server.start_step(0.0)  # 512 tokens of the first prompt
    assert server.queued_tokens() == 1300 - 512
    server.finish_step()
    server.start_step(0.512)  # the first prompt's last 488 and 24 of the second
    assert server.queued_tokens() == 276


def test_a_busy_prefill_worker_is_seen_busy_for_the_rest_of_its_step_only() -> None:
    """A prompt arriving 0.9 s into a 1.0 s remote prefill sees 0.1 s of queue (the view the
    placement rule is given; remote placement builds it too)."""
    import planner.simulator as sim

    seen: list[float] = []
    real = sim.choose

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(args[2][0].queue_s)
        return real(*args, **kwargs)

    sim.choose = spy
    try:
        simulate(small_profile(), ClusterSpec(1, 1),
                 [SimRequest(0.0, 1000, 4), SimRequest(0.9, 500, 4)])
    finally:
        sim.choose = real
    assert seen[0] == 0.0 and seen[1] == pytest.approx(0.1, abs=0.02)


def test_corun_factors_slow_a_step_that_starts_beside_another_workers_step() -> None:
    """Workers sharing one CPU: a decode step that starts while the prefill worker computes
    takes the light-under-heavy factor; alone it takes the profile's time."""
    from planner.profile import CoRun

    reqs = [SimRequest(0.0, 16, 30), SimRequest(0.1, 1000, 2)]  # 1 s prefill from 0.1 s
    plain = simulate(small_profile(), ClusterSpec(1, 1), reqs)
    shared = simulate(small_profile(), ClusterSpec(1, 1, corun=CoRun(1.0, 2.0, 1.0, 1.0)), reqs)
    assert shared[0].ttft_s == pytest.approx(plain[0].ttft_s)  # its prefill ran alone
    assert shared[0].tpot_s > 1.5 * plain[0].tpot_s  # its decode steps ran beside the prefill
    with pytest.raises(ProfileError, match="co-run factor"):
        CoRun(1.0, 0.0, 1.0, 1.0)
    with pytest.raises(ProfileError, match="four numbers"):
        CoRun.parse("1.2,1.1")
    assert CoRun.parse("1.1,1.2,1.3,1.4").factor(False, True) == 1.2
