"""Rank 0's rules for tensor-parallel KV, with the follower ranks' answers scripted (no model,
no processes, milliseconds): decode/tp_inbox.py admits a request only once every rank has its
heads and fails it on every rank as soon as one rank's transfer failed (retryable unless one
failure was not); prefill/tp_outbox.py queues rank 0's routes with the right heads, addresses
and route counts, and reports a request only once every rank's sends ended, so no block is
freed while a follower still reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from decode.kv_inbox import KvArrival
from decode.tp_inbox import TpKvInbox
from engine.kv_spec import KvSpec
from prefill.kv_outbox import TransferOutcome
from prefill.tp_outbox import RoutedOutbox
from protocol.errors import ErrorCode
from protocol.kv_meta import FIRST_TOKEN_KEY
from protocol.tp_ranks import KvExpect, KvForget, KvSend, RankPoll
from transfer.convert.cache import PagedKvCache
from transfer.endpoint.parts import ROUTES_KEY
from transfer.wire.errors import TransferTimeout

ADDRS = ["tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002"]
D1 = KvSpec(2, 3, 64, 16)
D3 = KvSpec(2, 1, 64, 16, tp_size=3)


@dataclass
class FakeLink:
    """Rank 0's RankLink with the followers' poll answers scripted (`followers`: what they add
    to each slot's column, by slot)."""

    size: int = 3
    told: list[Any] = field(default_factory=list)
    followers: dict[int, list[int]] = field(default_factory=dict)
    num_syncs: int = 0
    _slot: int = 0

    def infos(self) -> list[str]:
        return ADDRS[1:self.size]

    def new_slot(self) -> int:
        self._slot += 1
        return self._slot

    def tell(self, msg: object) -> None:
        self.told.append(msg)

    def sync(self) -> None:
        self.num_syncs += 1

    def poll(self, slots: list[int], mine: np.ndarray) -> np.ndarray:
        self.tell(RankPoll(list(slots)))
        for i, slot in enumerate(slots):
            mine[:, i] += self.followers.get(slot, [0, 0, 0, 0])
        return mine


@dataclass
class FakeInbox:
    address: str = ADDRS[0]
    arrivals: list[KvArrival] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)

    def expect(self, request_id: str, block_ids: list[int], token: str = "") -> None:
        pass

    def forget(self, request_id: str) -> None:
        self.forgotten.append(request_id)

    def receive(self) -> list[KvArrival]:
        out, self.arrivals = self.arrivals, []
        return out


def _inbox() -> tuple[TpKvInbox, FakeInbox, FakeLink]:
    local, link = FakeInbox(), FakeLink()
    return TpKvInbox(local, link), local, link  # type: ignore[arg-type]


def test_a_request_lands_once_every_rank_has_its_heads() -> None:
    inbox, local, link = _inbox()
    assert inbox.addresses == ADDRS
    inbox.expect("r", [3, 4], "tok")
    assert link.told == [KvExpect(1, "r", [3, 4], "tok")] and link.num_syncs == 1
    local.arrivals.append(KvArrival("r", first_token=42))
    link.followers[1] = [1, 0, 0, 0]  # one follower of two
    assert inbox.receive() == []
    link.followers[1] = [2, 0, 0, 0]
    assert inbox.receive() == [KvArrival("r", first_token=42)]
    assert inbox.receive() == [] and not local.forgotten  # over: no more polls about it


def test_a_failure_on_one_rank_fails_the_request_on_all() -> None:
    inbox, local, link = _inbox()
    inbox.expect("r", [3], "")
    inbox.expect("s", [4], "")
    link.followers = {1: [0, 1, 0, 0], 2: [0, 1, 1, 0]}  # r: retryable, s: not
    got = {a.request_id: a for a in inbox.receive()}
    assert got["r"].error is not None and got["r"].retryable
    assert got["s"].error is not None and not got["s"].retryable
    assert sorted(local.forgotten) == ["r", "s"]  # rank 0 stops writing their blocks
    assert inbox.receive() == []


def test_forget_withdraws_the_expectation_on_every_rank() -> None:
    inbox, local, link = _inbox()
    inbox.expect("r", [3], "")
    inbox.forget("r")
    assert local.forgotten == ["r"] and link.told[-1] == KvForget(1)
    assert inbox.receive() == [] and not isinstance(link.told[-1], RankPoll)


@dataclass
class FakeOutbox:
    cache: PagedKvCache
    sent: list[tuple[Any, ...]] = field(default_factory=list)
    results: list[TransferOutcome] = field(default_factory=list)

    def send(self, request_id: str, address: str, block_table: list[int], num_tokens: int,
             dest_spec: KvSpec, meta: dict[str, Any], kv_token: str = "",
             head_range: tuple[int, int] | None = None) -> None:
        self.sent.append((address, dest_spec.tp_rank, head_range, meta[ROUTES_KEY],
                          FIRST_TOKEN_KEY in meta))

    def poll_results(self) -> list[TransferOutcome]:
        out, self.results = self.results, []
        return out


def test_p1_to_d3_sends_each_decode_rank_its_head_and_reports_once_all_ended() -> None:
    outbox = FakeOutbox(PagedKvCache.allocate(D1, 4))
    routed = RoutedOutbox(outbox, None)  # type: ignore[arg-type]
    assert routed.is_routed(D3) and not routed.is_routed(D1)
    routed.send("r", D3, ADDRS, [1, 2], 20, {FIRST_TOKEN_KEY: 7}, "tok")
    assert outbox.sent == [(ADDRS[r], r, (r, r + 1), 1, True) for r in range(3)]
    outbox.results = [TransferOutcome("r", 100), TransferOutcome("r", 100)]
    assert routed.poll_results() == []  # one route still on the wire: the blocks stay
    outbox.results = [TransferOutcome("r", 100), TransferOutcome("other", 5)]
    got = routed.poll_results()
    assert got == [TransferOutcome("other", 5), TransferOutcome("r", 300)]


def test_p3_to_d1_waits_for_every_rank_and_fails_if_one_failed() -> None:
    outbox = FakeOutbox(PagedKvCache.allocate(D1.with_(num_kv_heads=1, tp_size=3), 4))
    link = FakeLink()
    routed = RoutedOutbox(outbox, link)  # type: ignore[arg-type]
    routed.send("r", D1, [ADDRS[0]], [1, 2], 20, {FIRST_TOKEN_KEY: 7}, "tok")
    assert outbox.sent == [(ADDRS[0], 0, (0, 1), 3, True)]  # D1 waits for 3 routes
    assert link.told == [KvSend(1, "r", [1, 2], 20, D1, [ADDRS[0]], "tok")]
    outbox.results = [TransferOutcome("r", 100)]
    link.followers[1] = [1, 0, 0, 100]  # one follower done, one still sending
    assert routed.poll_results() == []
    link.followers[1] = [1, 1, 0, 100]  # ... which failed (retryable)
    (outcome,) = routed.poll_results()
    assert outcome.error is not None and "1 tensor-parallel rank" in outcome.error
    assert outcome.code is ErrorCode.KV_TRANSFER and outcome.num_bytes == 200


def test_rank_0s_own_failure_is_reported_with_its_error() -> None:
    outbox = FakeOutbox(PagedKvCache.allocate(D1, 4))
    routed = RoutedOutbox(outbox, None)  # type: ignore[arg-type]
    routed.send("r", D3, ADDRS, [1], 5, {}, "")
    outbox.results = [TransferOutcome("r", 10),
                      TransferOutcome.failed("r", TransferTimeout("no ack")),
                      TransferOutcome("r", 10)]
    (outcome,) = routed.poll_results()
    assert outcome.error is not None and "no ack" in outcome.error
    assert outcome.code is ErrorCode.KV_TRANSFER
