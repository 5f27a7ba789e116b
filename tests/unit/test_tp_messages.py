"""The messages that carry a tensor-parallel decode worker's per-rank KV receivers: Hello and
Prefill list every rank's address (rank 0's being `kv_address`), one per `kv_spec.tp_size`,
checked as the codec builds them; the rank-0 -> follower family round-trips. A wrong count or
address is a MalformedMessage naming the field. No model, no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from engine.kv_spec import KvSpec
from engine.sampling_params import SamplingParams
from protocol import prefill_ctrl as pmsg
from protocol import worker_events as ev
from protocol.codec import MalformedMessage, MessageFamily
from protocol.tp_ranks import TP_RANKS, KvExpect, KvForget, KvSend, RankPoll

SPEC = KvSpec(30, 1, 64, 16, tp_size=3)  # rank 0 of 3: one KV head each
ADDRS = ["tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002"]


def _prefill(**changes: Any) -> pmsg.Prefill:
    fields: dict[str, Any] = {"request_id": "r", "prompt_ids": [1, 2], "params":
                              SamplingParams(max_tokens=2), "decode_id": "decode-0",
                              "kv_address": ADDRS[0], "block_ids": [4], "kv_spec": SPEC,
                              "kv_rank_addresses": ADDRS}
    return pmsg.Prefill(**{**fields, **changes})


def _hello(**changes: Any) -> ev.Hello:
    fields: dict[str, Any] = {"worker_id": "decode-0", "role": "decode",
                              "ctrl_address": "tcp://127.0.0.1:4000", "kv_address": ADDRS[0],
                              "kv_spec": SPEC, "plan": "", "pid": 7, "host": "h",
                              "kv_rank_addresses": ADDRS}
    return ev.Hello(**{**fields, **changes})


def _forged(family: MessageFamily, msg: Any, **fields: Any) -> bytes:
    """`msg` encoded, then its fields replaced on the wire (what a forger could send)."""
    import msgpack

    raw = msgpack.unpackb(family.encode(msg), raw=False)
    raw["d"].update(fields)
    return msgpack.packb(raw, use_bin_type=True)


@pytest.mark.parametrize(("family", "msg"), [
    (pmsg.PREFILL_CTRL, _prefill()),
    (ev.WORKER_EVENTS, _hello()),
    (TP_RANKS, KvExpect(1, "r", [4, 5], "tok")),
    (TP_RANKS, KvForget(1)),
    (TP_RANKS, KvSend(2, "r", [4, 5], 20, SPEC, ADDRS, "tok")),
    (TP_RANKS, RankPoll([1, 2])),
])
def test_round_trip(family: MessageFamily, msg: Any) -> None:
    assert family.decode(family.encode(msg)) == msg


@pytest.mark.parametrize(("family", "msg", "fields", "error"), [
    (pmsg.PREFILL_CTRL, _prefill(), {"kv_rank_addresses": []},
     "kv_rank_addresses: kv_spec.tp_size is 3 but no rank addresses"),
    (pmsg.PREFILL_CTRL, _prefill(), {"kv_rank_addresses": ADDRS[:2]},
     "kv_rank_addresses must list kv_spec.tp_size \\(3\\)"),
    (pmsg.PREFILL_CTRL, _prefill(), {"kv_rank_addresses": ADDRS[::-1]},
     "kv_address first"),
    (ev.WORKER_EVENTS, _hello(), {"kv_rank_addresses": [ADDRS[0], "nowhere", ADDRS[2]]},
     "kv_rank_addresses\\[1\\] must be tcp://host:port"),
])
def test_bad_rank_addresses_are_refused_naming_the_field(family: MessageFamily, msg: Any,
                                                         fields: dict[str, Any],
                                                         error: str) -> None:
    with pytest.raises(MalformedMessage, match=error):
        family.decode(_forged(family, msg, **fields))


def test_one_rank_needs_no_rank_addresses() -> None:
    spec = SPEC.with_(tp_size=1, num_kv_heads=3)
    assert _prefill(kv_spec=spec, kv_rank_addresses=[]).kv_rank_addresses == []
    assert _hello(kv_spec=spec, kv_rank_addresses=[]).kv_rank_addresses == []
