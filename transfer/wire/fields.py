"""Typed field readers of a decoded KV header (header.py): each checks a msgpack value's type
and range and raises `MalformedHeader` (or `LimitExceeded` for a list too long) naming it."""

from __future__ import annotations

from typing import Any

from transfer.wire.errors import LimitExceeded, MalformedHeader

U64 = (1 << 64) - 1


def int_field(v: Any, what: str, lo: int = 0, hi: int = U64) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise MalformedHeader(f"{what} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise MalformedHeader(f"{what} {v} outside [{lo}, {hi}]")
    return v


def ints(values: list[Any], what: str, lo: int = 0) -> tuple[int, ...]:
    """Many ints at once; the per-item message is built only when one is bad."""
    if all(type(x) is int and lo <= x <= U64 for x in values):
        return tuple(values)
    return tuple(int_field(x, f"{what}[{i}]", lo) for i, x in enumerate(values))


def pair(v: Any, what: str) -> tuple[int, int]:
    if not isinstance(v, list) or len(v) != 2:
        raise MalformedHeader(f"{what} must be a [start, end] pair")
    a, b = int_field(v[0], f"{what}[0]"), int_field(v[1], f"{what}[1]")
    if a >= b:
        raise MalformedHeader(f"{what} [{a}, {b}) is empty")
    return a, b


def int_list(v: Any, what: str, max_len: int, lo: int = 0) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise MalformedHeader(f"{what} must be a list")
    if len(v) > max_len:
        raise LimitExceeded(f"{what} length", len(v), max_len)
    return ints(v, what, lo)
