"""The control plane's codec over the real message families: every message type round-trips
with its typed fields (SamplingParams, KvSpec, TokenLogprob, FinishReason, ErrorCode); a forged
field at any depth is a MalformedMessage naming its path, never a bare exception; a decoded
value is validated by the same constructor as one built in-process; a family cannot declare a
field the codec cannot type. No model, no sockets, milliseconds."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from engine.errors import RequestError
from engine.kv_spec import KvDtype, KvKind, KvLayout, KvSpec, ScaleGranularity
from engine.outputs import FinishReason, TokenLogprob
from engine.sampling_params import SamplingParams
from protocol import decode_ctrl as dmsg
from protocol import prefill_ctrl as pmsg
from protocol import worker_events as ev
from protocol.codec import MalformedMessage, MessageFamily, ValueCodec
from protocol.errors import ErrorCode
from protocol.kv_meta import FirstToken

PARAMS = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, seed=2**64 - 1,
                        stop_token_ids=(2, 3), ignore_eos=True, logprobs=2, min_tokens=1,
                        frequency_penalty=0.5, presence_penalty=-1.0, repetition_penalty=1.2,
                        logit_bias=((7, -100.0), (9, 2.5)), prompt_logprobs=1)
SPEC = KvSpec(30, 3, 64, 16, dtype=KvDtype.INT8, layout=KvLayout.HND,
              scale_granularity=ScaleGranularity.PER_HEAD, model_fingerprint="f00d")
LOGPROBS = [TokenLogprob(5, -0.25, [(5, -0.25), (9, -1.5)]), TokenLogprob(6, float("-inf"))]

MESSAGES: list[tuple[MessageFamily, Any]] = [
    (dmsg.DECODE_CTRL, dmsg.Reserve("r1", [1, 2, 3], PARAMS, False, 2.5)),
    (dmsg.DECODE_CTRL, dmsg.PrefillLocally("r1")),
    (dmsg.DECODE_CTRL, dmsg.Abort("r1", "client")),
    (dmsg.DECODE_CTRL, dmsg.AbortAll("restarted")),
    (dmsg.DECODE_CTRL, dmsg.Shutdown("bye")),
    (pmsg.PREFILL_CTRL, pmsg.Prefill("r1", [1, 2], PARAMS, "d0", "tcp://h:1", [4, 5], SPEC)),
    (pmsg.PREFILL_CTRL, pmsg.Abort("r1")),
    (pmsg.PREFILL_CTRL, pmsg.AbortAll()),
    (pmsg.PREFILL_CTRL, pmsg.Shutdown()),
    (ev.WORKER_EVENTS, ev.Hello("p0", "prefill", "tcp://h:2", "tcp://h:3", SPEC, "plan", 42,
                                "host", "m")),
    (ev.WORKER_EVENTS, ev.Heartbeat("d0", "decode", 1, 2, 3, 4, 7, 5)),
    (ev.WORKER_EVENTS, ev.Reserved("r1", "d0", [4, 5])),
    (ev.WORKER_EVENTS, ev.Rejected("r1", "d0", "full", 503, 1.0)),
    (ev.WORKER_EVENTS, ev.Tokens("r1", "d0", [5, 6], LOGPROBS, FinishReason.LENGTH, 3, 1)),
    (ev.WORKER_EVENTS, ev.Tokens("r1", "d0", [5])),
    (ev.WORKER_EVENTS, ev.PrefillDone("r1", "p0", 16, 1 << 20, 0.01)),
    (ev.WORKER_EVENTS, ev.RequestFailed("r1", "p0", "boom", ErrorCode.KV_TRANSFER)),
    (ev.WORKER_EVENTS, ev.PromptLogprobs("r1", "p0", LOGPROBS, 40, False)),
]


@pytest.mark.parametrize("family,msg", MESSAGES, ids=[type(m).__name__ for _, m in MESSAGES])
def test_every_message_round_trips_typed(family: MessageFamily, msg: Any) -> None:
    back = family.decode(family.encode(msg))
    assert back == msg and type(back) is type(msg)
    for name in vars(msg):  # nested values come back as their own types, not dicts or lists
        assert type(getattr(back, name)) is type(getattr(msg, name)), name


def test_every_message_type_is_covered() -> None:
    for family in (dmsg.DECODE_CTRL, pmsg.PREFILL_CTRL, ev.WORKER_EVENTS):
        assert {type(m) for f, m in MESSAGES if f is family} == set(family.types), family.name


def test_typed_fields_travel_as_msgpack_structures() -> None:
    """Nested dataclasses are maps, enums their values: never a JSON string, never pickle."""
    raw = msgpack.unpackb(ev.WORKER_EVENTS.encode(MESSAGES[13][1]))
    assert raw["d"]["logprobs"][0] == {"token_id": 5, "logprob": -0.25,
                                       "top": [[5, -0.25], [9, -1.5]], "rank": 0}
    assert raw["d"]["finish_reason"] == "length"
    prefill = msgpack.unpackb(pmsg.PREFILL_CTRL.encode(MESSAGES[5][1]))["d"]
    assert prefill["params"]["stop_token_ids"] == [2, 3]
    assert prefill["kv_spec"]["dtype"] == "int8" and prefill["kv_spec"]["block_size"] == 16
    with pytest.raises(MalformedMessage, match="not msgpack"):
        ev.WORKER_EVENTS.decode(pickle.dumps(MESSAGES[13][1]))


def _forge(family: MessageFamily, msg: Any, fn: Callable[[dict], None]) -> bytes:
    raw = copy.deepcopy(msgpack.unpackb(family.encode(msg)))
    fn(raw["d"])
    return msgpack.packb(raw, use_bin_type=True)


FORGED: list[tuple[int, Callable[[dict], None], str]] = [
    (0, lambda d: d["params"].update(max_tokens="7"),
     "Reserve.params.max_tokens: expected int, got str"),
    (0, lambda d: d["params"].update(max_tokens=0),
     "Reserve.params: max_tokens must be at least 1, got 0"),
    (0, lambda d: d["params"].update(temperature=True),
     "Reserve.params.temperature: expected float, got bool"),
    (0, lambda d: d["params"].update(top_k=-2), "Reserve.params: top_k must be -1"),
    (0, lambda d: d["params"].update(min_tokens=-1), "Reserve.params.min_tokens: -1 is below 0"),
    (0, lambda d: d["params"]["stop_token_ids"].append(None),
     r"Reserve.params.stop_token_ids\[2\]: expected int, got NoneType"),
    (0, lambda d: d["params"].update(stop="###"), r"Reserve.params: unknown fields \['stop'\]"),
    (0, lambda d: d.update(params={"max_tokens": 7}), None),  # defaults fill the rest
    (0, lambda d: d.update(params=None), "Reserve.params: expected SamplingParams, got NoneType"),
    (0, lambda d: d.update(params=[7, 1.0]), "Reserve.params: expected SamplingParams, got list"),
    (0, lambda d: d["prompt_ids"].__setitem__(1, "x"),
     r"Reserve.prompt_ids\[1\]: expected int, got str"),
    (5, lambda d: d["kv_spec"].update(dtype="float64"),
     "Prefill.kv_spec.dtype: expected KvDtype, got 'float64'"),
    (5, lambda d: d["kv_spec"].update(kind="latent"), "Prefill.kv_spec: kind latent does not go"),
    (5, lambda d: d["kv_spec"].update(num_layers=0), "Prefill.kv_spec: KvSpec.num_layers must"),
    (5, lambda d: d["kv_spec"].pop("head_dim"), "Prefill.kv_spec: missing field 'head_dim'"),
    (5, lambda d: d["kv_spec"].update(extra={}), r"Prefill.kv_spec: unknown fields \['extra'\]"),
    (9, lambda d: d["kv_spec"].update(block_size="16"),
     "Hello.kv_spec.block_size: expected int, got str"),
    (13, lambda d: d["logprobs"][0]["top"][1].__setitem__(0, "9"),
     r"Tokens.logprobs\[0\].top\[1\]\[0\]: expected int, got str"),
    (13, lambda d: d["logprobs"][0]["top"][0].append(1.0),
     r"Tokens.logprobs\[0\].top\[0\]: expected 2 items, got 3"),
    (13, lambda d: d["logprobs"].__setitem__(1, [6, -0.5, []]),  # the old positional form
     r"Tokens.logprobs\[1\]: expected TokenLogprob, got list"),
    (13, lambda d: d["logprobs"][1].update(logprob="-inf"),
     r"Tokens.logprobs\[1\].logprob: expected float, got str"),
    (13, lambda d: d.update(finish_reason="done"),
     "Tokens.finish_reason: expected FinishReason, got 'done'"),
    (16, lambda d: d.update(code="retry_me"), "RequestFailed.code: expected ErrorCode"),
    (16, lambda d: d.update(retryable=True), r"RequestFailed: unknown fields \['retryable'\]"),
    (4, lambda d: d.update(extra={}), r"Shutdown: unknown fields \['extra'\]"),
    (10, lambda d: d.update(kv_bytes=1), r"Heartbeat: unknown fields \['kv_bytes'\]"),
]


@pytest.mark.parametrize("index,fn,error", FORGED, ids=[f[2] or "ok" for f in FORGED])
def test_forged_nested_fields_name_their_path(index: int, fn: Callable[[dict], None],
                                              error: str | None) -> None:
    family, msg = MESSAGES[index]
    frame = _forge(family, msg, fn)
    if error is None:
        assert family.decode(frame).params == SamplingParams(max_tokens=7)
        return
    with pytest.raises(MalformedMessage, match=f"^{error}"):
        family.decode(frame)


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"temperature": 101.0}, {"top_p": 0.0},
                                 {"logprobs": 21}, {"top_k": -5}, {"temperature": float("nan")}])
def test_a_decoded_sampling_params_is_validated_as_a_constructed_one(bad: dict) -> None:
    with pytest.raises(RequestError) as constructed:
        SamplingParams(**bad)
    frame = _forge(*MESSAGES[0], lambda d: d["params"].update(bad))
    with pytest.raises(MalformedMessage) as decoded:
        dmsg.DECODE_CTRL.decode(frame)
    assert str(decoded.value) == f"Reserve.params: {constructed.value}"


@dataclass(frozen=True)
class Loose:
    extra: dict[str, Any]


@dataclass(frozen=True)
class Anything:
    value: Any


@dataclass
class Mutable:
    n: int


@dataclass(frozen=True)
class HoldsMutable:
    inner: Mutable


@dataclass(frozen=True)
class Either:
    value: int | str


@pytest.mark.parametrize("cls", [Loose, Anything, HoldsMutable, Either])
def test_a_family_cannot_declare_an_untyped_field(cls: type) -> None:
    with pytest.raises(TypeError):
        MessageFamily("test", (cls,))


def test_error_codes_say_what_is_retryable() -> None:
    retryable = {c for c in ErrorCode if c.retryable}
    assert retryable == {ErrorCode.OVERLOADED, ErrorCode.KV_TRANSFER}
    assert ErrorCode.of_transfer(True) is ErrorCode.KV_TRANSFER
    assert ErrorCode.of_transfer(False) is ErrorCode.KV_REFUSED
    for code in ErrorCode:
        msg = ev.RequestFailed("r", "w", "e", code)
        assert ev.WORKER_EVENTS.decode(ev.WORKER_EVENTS.encode(msg)).retryable is code.retryable


def test_first_token_meta_is_typed_and_a_bad_logprob_is_dropped() -> None:
    first = FirstToken(7, LOGPROBS[0], 16)
    meta = msgpack.unpackb(msgpack.packb(first.to_meta()))  # as the KV header carries it
    assert not any(isinstance(v, str) for v in meta.values())  # no JSON string inside
    assert FirstToken.from_meta(meta) == first
    assert FirstToken.from_meta({"first_token": 7}) == FirstToken(7)
    for bad in ("[5, -0.25, []]", [5, -0.25, []], {"token_id": "5", "logprob": 0.0},
                {"token_id": 5, "logprob": 0.0, "top": [[1]]}, {"token_id": 5}):
        assert FirstToken.from_meta({**meta, "first_logprob": bad}) == FirstToken(7, None, 16)
    assert FirstToken.from_meta({**meta, "num_cached_tokens": -3}).num_cached_tokens == 0
    for token in (None, -1, "7", True):
        with pytest.raises(MalformedMessage, match="without a valid first token"):
            FirstToken.from_meta({**meta, "first_token": token})


def test_value_codec_round_trips_a_value_outside_a_message() -> None:
    codec = ValueCodec(KvSpec, KvSpec | None)
    spec = KvSpec(2, 1, 128, 32, dtype=KvDtype.FP8_E4M3, layout=KvLayout.MLA,
                  kind=KvKind.LATENT, scale_granularity=ScaleGranularity.PER_TENSOR)
    assert codec.decode(KvSpec, msgpack.unpackb(msgpack.packb(codec.encode(KvSpec, spec))),
                        "spec") == spec
    assert codec.decode(KvSpec | None, None, "spec") is None
    with pytest.raises(MalformedMessage, match=r"^spec: expected KvSpec, got int"):
        codec.decode(KvSpec, 3, "spec")
    with pytest.raises(TypeError):  # not a root: nothing is decoded unchecked
        codec.decode(SamplingParams, {}, "params")


def _forged(family: MessageFamily, type_name: str, fields: dict[str, Any]) -> bytes:
    return msgpack.packb({"t": type_name, "v": 1, "d": fields}, use_bin_type=True)


@pytest.mark.parametrize(("fields", "path"), [
    ({"steps": [{"seconds": -1.0, "num_prefill_tokens": 1, "num_decode_seqs": 0,
                 "num_context_tokens": 1}]}, "Heartbeat"),
    ({"steps": [{"seconds": float("nan"), "num_prefill_tokens": 1, "num_decode_seqs": 0,
                 "num_context_tokens": 1}]}, "Heartbeat"),
    ({"steps": [{"seconds": 0.1, "num_prefill_tokens": "many", "num_decode_seqs": 0,
                 "num_context_tokens": 1}]}, "Heartbeat.steps"),
])
def test_forged_step_timings_in_a_heartbeat_are_malformed(fields: dict[str, Any],
                                                          path: str) -> None:
    """The placement cost models learn from these: a forged step never reaches them."""
    base = {"worker_id": "d0", "role": "decode", "num_running": 0, "num_waiting": 0,
            "num_used_blocks": 0, "num_free_blocks": 8, "num_blocks": 8}
    with pytest.raises(MalformedMessage, match=path):
        ev.WORKER_EVENTS.decode(_forged(ev.WORKER_EVENTS, "Heartbeat", {**base, **fields}))


def test_reserve_prefill_chunk_must_be_an_int() -> None:
    fields = {"request_id": "r", "prompt_ids": [1], "params": {"max_tokens": 4},
              "prefill_chunk": "big"}
    with pytest.raises(MalformedMessage, match="prefill_chunk"):
        dmsg.DECODE_CTRL.decode(_forged(dmsg.DECODE_CTRL, "Reserve", fields))


def test_prompt_logprobs_travel_in_parts_under_the_event_frame() -> None:
    """A 4096-token prompt's logprobs with the top 20 each: every part fits the proxy's 64 KiB
    event frame, and the parts assemble in order (a retried prefill starts over)."""
    import asyncio

    from proxy.cluster import EVENT_FRAME_BYTES
    from proxy.cluster_state import RequestState

    entries = [TokenLogprob(40000 + i, -1.0 / (i + 1), [(49000 + j, -0.1 * j) for j in range(20)],
                            i + 1) for i in range(4095)]
    parts = ev.prompt_logprobs_events("r1", "p0", entries, 20)
    assert len(parts) > 1 and [p.is_last for p in parts].count(True) == 1 and parts[-1].is_last
    assert max(len(ev.WORKER_EVENTS.encode(p)) for p in parts) < EVENT_FRAME_BYTES // 2
    req = RequestState("r1", [1, 2], PARAMS, asyncio.Queue(), "d0")
    req.add_prompt_logprobs(parts[0])
    req.add_prompt_logprobs(parts[2])  # out of order: dropped
    assert req.prompt_logprobs is None and not req.prompt_logprobs_arrived.is_set()
    for part in parts:  # a retry sends them all again, from the first
        req.add_prompt_logprobs(ev.WORKER_EVENTS.decode(ev.WORKER_EVENTS.encode(part)))
    assert req.prompt_logprobs == entries and req.prompt_logprobs_arrived.is_set()
