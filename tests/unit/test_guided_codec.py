"""A guided decoding spec on the control plane: it round-trips inside SamplingParams through the
real codec, and a forged one (unknown kind, oversized spec, wrong type) is a MalformedMessage
naming its path, validated by the same constructor as one built in-process."""

from __future__ import annotations

import msgpack
import pytest

from engine.errors import RequestError
from engine.guided import MAX_GUIDED_SPEC_BYTES, GuidedDecoding, GuidedKind
from engine.sampling_params import SamplingParams
from protocol import decode_ctrl as dmsg
from protocol.codec import MalformedMessage

PARAMS = SamplingParams(max_tokens=7, guided=GuidedDecoding(GuidedKind.JSON_SCHEMA,
                                                            '{"type": "object"}'))


def _frame(edit: object = None) -> bytes:
    raw = msgpack.unpackb(dmsg.DECODE_CTRL.encode(dmsg.Reserve("r1", [1, 2], PARAMS, False, 1.0)))
    if callable(edit):
        edit(raw["d"]["params"])
    return msgpack.packb(raw)


def test_guided_params_round_trip() -> None:
    assert dmsg.DECODE_CTRL.decode(_frame()).params == PARAMS


@pytest.mark.parametrize("edit,error", [
    (lambda p: p["guided"].update(kind="lark2"), "Reserve.params.guided.kind: expected GuidedKind"),
    (lambda p: p["guided"].update(spec=7), "Reserve.params.guided.spec: expected str, got int"),
    (lambda p: p["guided"].update(spec="x" * (MAX_GUIDED_SPEC_BYTES + 1)),
     f"Reserve.params.guided: guided decoding spec is {MAX_GUIDED_SPEC_BYTES + 1} bytes"),
    (lambda p: p["guided"].update(kind="regex", spec=""),
     "Reserve.params.guided: guided decoding of kind regex needs a spec"),
    (lambda p: p.update(guided="json"), "Reserve.params.guided: expected GuidedDecoding"),
])
def test_forged_guided_spec_is_malformed(edit: object, error: str) -> None:
    with pytest.raises(MalformedMessage, match=f"^{error}"):
        dmsg.DECODE_CTRL.decode(_frame(edit))


def test_constructed_guided_spec_is_checked() -> None:
    with pytest.raises(RequestError, match="needs a spec"):
        GuidedDecoding(GuidedKind.CHOICE)
    with pytest.raises(RequestError, match="guided must be a GuidedDecoding"):
        SamplingParams(guided="json")  # type: ignore[arg-type]
