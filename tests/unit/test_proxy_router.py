"""Routing policies (proxy/router.py) over hand-made worker snapshots."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from proxy.router import (
    LeastLoaded,
    NoWorkerAvailable,
    PrefixAware,
    RoundRobin,
    WorkerState,
    block_hashes,
    make_policy,
)


def worker(worker_id: str, role: str = "decode", **fields: object) -> WorkerState:
    return WorkerState(worker_id=worker_id, role=role, address=f"tcp://127.0.0.1:0/{worker_id}",
                       **fields)  # type: ignore[arg-type]


def dead(state: WorkerState) -> WorkerState:
    return dataclasses.replace(state, is_alive=False)


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 49152 for i in range(length)]


def test_worker_state_validates() -> None:
    with pytest.raises(ValueError):
        worker("w", role="both")
    with pytest.raises(ValueError):
        worker("w", num_waiting=-1)
    with pytest.raises(ValueError):
        worker("w", kv_usage=1.5)


@pytest.mark.parametrize("policy", [RoundRobin(), LeastLoaded(), PrefixAware()])
def test_no_live_worker_raises(policy: object) -> None:
    with pytest.raises(NoWorkerAvailable) as exc:
        policy.choose([dead(worker("d0"))], [1, 2, 3])  # type: ignore[attr-defined]
    assert exc.value.role == "decode" and exc.value.num_known == 1
    with pytest.raises(NoWorkerAvailable):
        policy.choose([], [])  # type: ignore[attr-defined]


def test_round_robin_cycles_over_live_workers() -> None:
    policy = RoundRobin()
    workers = [worker("d2"), dead(worker("d1")), worker("d0")]
    chosen = [policy.choose(workers, []).worker_id for _ in range(4)]
    assert chosen == ["d0", "d2", "d0", "d2"]


def test_least_loaded_prefers_no_queue_then_kv_then_running() -> None:
    policy = LeastLoaded()
    busy_queue = worker("a", num_waiting=1, kv_usage=0.1)
    full_kv = worker("b", kv_usage=0.9)
    light = worker("c", kv_usage=0.3, num_running=9)
    lighter = worker("d", kv_usage=0.31, num_running=2)  # same KV step as c, fewer running
    assert policy.choose([busy_queue, full_kv, light, lighter], []).worker_id == "d"
    assert policy.choose([busy_queue, full_kv], []).worker_id == "b"
    assert policy.choose([busy_queue, dead(full_kv)], []).worker_id == "a"


def test_least_loaded_rotates_over_ties() -> None:
    policy = LeastLoaded()
    workers = [worker("a"), worker("b"), worker("c", num_running=1)]
    chosen = Counter(policy.choose(workers, []).worker_id for _ in range(10))
    assert chosen == {"a": 5, "b": 5}


def test_block_hashes_are_chained_and_deterministic() -> None:
    ids = prompt(1, 50)
    hashes = block_hashes(ids, block_size=16, max_blocks=100)
    assert len(hashes) == 3  # only full blocks
    assert hashes == block_hashes([*ids, 5, 6], 16, 100)[:3]
    assert block_hashes([9, *ids[1:]], 16, 100)[2] != hashes[2]  # block 2 depends on block 0
    assert hashes[0] == block_hashes(ids[:16], 16, 100)[0]
    assert len(block_hashes(ids, 16, max_blocks=2)) == 2


PREFILL = [worker(f"p{i}", role="prefill") for i in range(4)]


def test_prefix_aware_same_prompt_same_worker_across_instances() -> None:
    ids = prompt(3, 100)
    first = PrefixAware().choose(PREFILL, ids).worker_id
    assert all(PrefixAware().choose(PREFILL, ids).worker_id == first for _ in range(3))
    assert PrefixAware().choose(list(reversed(PREFILL)), ids).worker_id == first


def test_prefix_aware_multi_turn_lands_on_the_same_worker() -> None:
    policy = PrefixAware(block_size=16, num_key_blocks=4)
    for seed in range(20):
        turn1 = prompt(seed, 40)  # 2 full blocks: shorter than the key
        turn2 = turn1 + prompt(seed + 1000, 60)
        turn3 = turn2 + prompt(seed + 2000, 30)
        chosen = {policy.choose(PREFILL, t).worker_id for t in (turn1, turn2, turn3)}
        assert len(chosen) == 1, seed


def test_prefix_aware_long_turns_need_no_memory() -> None:
    turn1 = prompt(5, 70)  # >= num_key_blocks full blocks
    turn2 = turn1 + prompt(6, 50)
    assert PrefixAware().choose(PREFILL, turn1) == PrefixAware().choose(PREFILL, turn2)


def test_prefix_aware_spreads_conversations() -> None:
    policy = PrefixAware()
    system = prompt(0, 32)  # a shared system prompt (2 blocks) must not pin everything
    chosen = Counter(policy.choose(PREFILL, system + prompt(s, 40)).worker_id
                     for s in range(200))
    assert len(chosen) == 4 and min(chosen.values()) > 20


def test_prefix_aware_falls_back_when_owner_dies_and_returns() -> None:
    ids = prompt(11, 80)
    owner = PrefixAware().choose(PREFILL, ids)
    others = [w if w != owner else dead(w) for w in PREFILL]
    policy = PrefixAware()
    substitute = policy.choose(others, ids)
    assert substitute.is_alive and substitute.worker_id != owner.worker_id
    assert policy.choose(others, ids) == substitute  # stays put while the owner is dead


def test_prefix_aware_avoids_an_overloaded_owner() -> None:
    ids = prompt(12, 80)
    owner = PrefixAware().choose(PREFILL, ids)
    loaded = [dataclasses.replace(w, num_waiting=20) if w == owner else w for w in PREFILL]
    assert PrefixAware(max_queue_imbalance=8).choose(loaded, ids) != owner


def test_short_prompts_use_the_fallback() -> None:
    workers = [worker("p0", "prefill", num_running=3), worker("p1", "prefill")]
    assert PrefixAware(block_size=16).choose(workers, [1, 2, 3]).worker_id == "p1"


def test_make_policy() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("least_loaded"), LeastLoaded)
    assert make_policy("prefix_aware", block_size=32).block_size == 32  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="prefix_aware"):
        make_policy("random")


def test_prefix_memory_is_bounded() -> None:
    policy = PrefixAware(max_entries=10)
    for seed in range(50):
        policy.choose(PREFILL, prompt(seed, 40))
    assert len(policy._owners) == 10
