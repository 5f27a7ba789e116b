"""Ranges and lengths of control-message fields, checked by the codec (protocol/codec.py)
before a message is built.

A field's bounds live in its dataclass metadata under the keys `BOUND_KEYS`: `lo` / `hi`
(inclusive) and `below` (exclusive) bound a number, or each number of a list; `max_len` bounds
a str, bytes or list; `keys_below` bounds the first number of each pair in a list of pairs
(`SamplingParams.logit_bias`: token id, bias). A bound is a number, or the name of a limit
only the receiver knows (`MAX_MODEL_LEN`, `VOCAB_SIZE`: a worker's `--max-model-len` and its
model's vocabulary), which the receiver gives to the codec's `decode(..., limits=...)`; a
named limit it does not give is not checked. `bounded(...)` builds such a field; a type below
protocol/ (`SamplingParams`) writes the same keys by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from typing import Any

BOUND_KEYS = ("lo", "hi", "below", "max_len", "keys_below")
MAX_MODEL_LEN = "max_model_len"
VOCAB_SIZE = "vocab_size"
MAX_ID_LEN = 256  # request and worker ids
MAX_ADDRESS_LEN = 512
MAX_TEXT_LEN = 8192  # reasons, errors, plan lines
MAX_KV_TOKEN_LEN = 64  # a reservation's KV token (transfer/wire/header.py MAX_TOKEN_LEN)

Bound = int | float | str  # a number, or the name of a receiver's limit


def bounded(default: Any = dataclasses.MISSING, *, lo: Bound | None = None,
            hi: Bound | None = None, below: Bound | None = None,
            max_len: Bound | None = None) -> Any:
    """A dataclass field with bounds that the codec checks before the message is built."""
    meta = {k: v for k, v in (("lo", lo), ("hi", hi), ("below", below), ("max_len", max_len))
            if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _numbers(raw: Any) -> list[Any]:
    """The numbers a bounded value holds: itself, or a list's numbers (nested pairs skipped)."""
    if isinstance(raw, bool):
        return []
    if isinstance(raw, int | float):
        return [raw]
    if isinstance(raw, list):
        return [x for x in raw if isinstance(x, int | float) and not isinstance(x, bool)]
    return []


def check_bounds(bounds: tuple[tuple[str, Bound], ...], raw: Any,
                 limits: Mapping[str, int]) -> str | None:
    """Why `raw` (already of its field's type) is out of its field's bounds; None if it is
    within them (or has none that this receiver knows)."""
    if raw is None:
        return None
    for key, bound in bounds:
        value = limits.get(bound) if isinstance(bound, str) else bound
        if value is None:
            continue  # a receiver's limit this receiver does not know
        name = f"{bound} {value}" if isinstance(bound, str) else str(value)
        if key == "max_len":
            if isinstance(raw, str | bytes | list) and len(raw) > value:
                return f"length {len(raw)} exceeds {name}"
            continue
        if key == "keys_below":
            keys = _numbers([x[0] for x in raw if isinstance(x, list | tuple) and x]
                            if isinstance(raw, list) else [])
            if keys and (high := max(keys)) >= value:
                return f"key {high!r:.30} is not below {name}"
            continue
        nums = _numbers(raw)
        if not nums:
            continue
        if key == "lo" and (low := min(nums)) < value:
            return f"{low!r:.30} is below {name}"
        if key == "hi" and (high := max(nums)) > value:
            return f"{high!r:.30} is above {name}"
        if key == "below" and (high := max(nums)) >= value:
            return f"{high!r:.30} is not below {name}"
    return None
