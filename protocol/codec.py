"""Typed control messages: dataclasses <-> msgpack, versioned, validated. Never pickle.

A channel declares its message family as a `MessageFamily` of dataclasses; every message on the
wire is `{"t": type name, "v": version, "d": {field: value}}`. Decoding checks the version, the
type name, the exact field set and each field's basic type before building the dataclass, so a
malformed or hostile frame becomes `MalformedMessage`, never a bare exception.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

import msgpack

CTRL_VERSION = 1
MAX_CTRL_BYTES = 64 << 20


class MalformedMessage(ValueError):
    """A control frame that is not a valid message of the channel's family."""


_BASIC = {int: (int,), float: (float, int), str: (str,), bool: (bool,), bytes: (bytes,),
          list: (list, tuple), dict: (dict,), tuple: (list, tuple)}


def _accepts(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    base = origin or tp
    allowed = _BASIC.get(base)
    if allowed is None:
        return True
    if base in (int, float) and isinstance(value, bool):
        return False
    if not isinstance(value, allowed):
        return False
    args = typing.get_args(tp)
    if base is list and args and args[0] in (int, str, float):
        return all(_accepts(args[0], v) for v in value)
    return True


@dataclass(frozen=True)
class MessageFamily:
    """The message types one channel may carry."""

    name: str
    types: tuple[type, ...]

    def _by_name(self) -> dict[str, type]:
        return {t.__name__: t for t in self.types}

    def encode(self, msg: Any) -> bytes:
        if type(msg) not in self.types:
            raise TypeError(f"{type(msg).__name__} is not a message of channel {self.name}")
        fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
        return msgpack.packb({"t": type(msg).__name__, "v": CTRL_VERSION, "d": fields},
                             use_bin_type=True)

    def decode(self, frame: bytes | memoryview) -> Any:
        if len(frame) > MAX_CTRL_BYTES:
            raise MalformedMessage(f"{self.name}: frame of {len(frame)} bytes exceeds {MAX_CTRL_BYTES}")
        try:
            raw = msgpack.unpackb(frame, raw=False, strict_map_key=True,
                                  max_bin_len=MAX_CTRL_BYTES, max_str_len=MAX_CTRL_BYTES)
        except Exception as e:  # msgpack raises several unrelated types
            raise MalformedMessage(f"{self.name}: not msgpack ({type(e).__name__}: {e})") from None
        if not isinstance(raw, dict) or set(raw) != {"t", "v", "d"} or not isinstance(raw["d"], dict):
            raise MalformedMessage(f"{self.name}: frame is not a {{t, v, d}} envelope")
        if raw["v"] != CTRL_VERSION:
            raise MalformedMessage(f"{self.name}: version {raw['v']!r}, this side speaks {CTRL_VERSION}")
        cls = self._by_name().get(raw["t"]) if isinstance(raw["t"], str) else None
        if cls is None:
            raise MalformedMessage(f"{self.name}: unknown message type {raw['t']!r}")
        return _build(cls, raw["d"])


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise MalformedMessage(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MalformedMessage(f"{cls.__name__}: missing field {name!r}")
            continue
        if not _accepts(hints[name], data[name]):
            raise MalformedMessage(
                f"{cls.__name__}.{name}: expected {hints[name]}, got {type(data[name]).__name__}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise MalformedMessage(f"{cls.__name__}: {e}") from None
