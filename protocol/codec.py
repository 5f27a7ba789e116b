"""Typed control messages: dataclasses <-> msgpack, versioned, validated. Never pickle.

A channel declares its message family as a `MessageFamily` of frozen dataclasses; every message
on the wire is `{"t": type name, "v": version, "d": {field: value}}`. A field is a plain value
(int, float, str, bool, bytes, None), an enum (its value on the wire), a frozen dataclass (a map
of its fields, by the same rules), a `list[X]`, a `tuple[X, ...]` / `tuple[X, Y]`, or `X | None`
of these. Nothing else: a family whose types hold a field of another type (`dict[str, Any]`,
`Any`) is a TypeError when it is declared.

Decoding checks the whole frame first (version, type name, the exact field set and the type of
every value, recursively), then builds each dataclass through its constructor, so its own
validation (`SamplingParams`, `KvSpec`) runs exactly as for one built in-process. Every failure
is `MalformedMessage` naming the path (`Reserve.params.max_tokens: expected int, got str`),
never a bare exception. `ValueCodec` offers the same to a typed value outside a message (the
first token's logprob in the KV header's meta).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

CTRL_VERSION = 1
MAX_CTRL_BYTES = 64 << 20


class MalformedMessage(ValueError):
    """A control frame that is not a valid message of the channel's family."""


_SCALARS: Mapping[type, tuple[type, ...]] = types.MappingProxyType(
    {int: (int,), float: (float, int), str: (str,), bool: (bool,), bytes: (bytes,)})
_NONE = type(None)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _optional_arg(tp: Any) -> Any | None:
    """X for `X | None`; None for any other type."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(tp) if a is not _NONE]
    if len(args) != 1 or len(typing.get_args(tp)) != 2:
        raise TypeError(f"{_type_name(tp)}: only `X | None` unions travel on the control plane")
    return args[0]


@dataclass(frozen=True)
class _Field:
    name: str
    hint: Any
    is_required: bool


def _fields_of(cls: type) -> tuple[_Field, ...]:
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:
        raise TypeError(f"{cls.__name__}: a field type does not resolve ({e})") from None
    return tuple(
        _Field(f.name, hints[f.name],
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(cls) if f.init)


class ValueCodec:
    """Encodes and decodes values of typed fields over the frozen dataclasses `roots` and every
    type reachable from their fields (checked here: an unsupported field type is a TypeError)."""

    def __init__(self, *roots: type) -> None:
        self._schemas: dict[type, tuple[_Field, ...]] = {}
        for cls in roots:
            self._register(cls, cls.__name__)

    def _register(self, tp: Any, where: str) -> None:
        try:
            inner = _optional_arg(tp)
        except TypeError as e:
            raise TypeError(f"{where}: {e}") from None
        if inner is not None:
            self._register(inner, where)
            return
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is list and len(args) == 1:
            self._register(args[0], where)
        elif origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            for a in args:
                self._register(a, where)
        elif origin is tuple and args:
            self._register(args[0], where)
        elif _is_enum(tp) or tp in _SCALARS:
            pass
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if tp not in self._schemas:
                if not tp.__dataclass_params__.frozen:  # type: ignore[attr-defined]
                    raise TypeError(f"{where}: {tp.__name__} is not a frozen dataclass")
                self._schemas[tp] = ()  # a cycle ends here
                self._schemas[tp] = _fields_of(tp)
                for f in self._schemas[tp]:
                    self._register(f.hint, f"{where}.{f.name}")
        else:
            raise TypeError(f"{where}: {_type_name(tp)} cannot travel on the control plane")

    # ---- encoding -------------------------------------------------------------------------------
    def encode(self, tp: Any, value: Any) -> Any:
        """`value` (of type `tp`) as plain msgpack values."""
        if value is None:
            return None
        inner = _optional_arg(tp)
        if inner is not None:
            return self.encode(inner, value)
        schema = self._schemas.get(tp)
        if schema is not None:
            return {f.name: self.encode(f.hint, getattr(value, f.name)) for f in schema}
        if isinstance(value, enum.Enum):
            return value.value
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (list, tuple):
            if all(a in _SCALARS for a in args if a is not Ellipsis):
                return value  # msgpack packs a list or tuple of plain values as it is
            if origin is list or args[-1] is Ellipsis:
                return [self.encode(args[0], v) for v in value]
            return [self.encode(a, v) for a, v in zip(args, value, strict=True)]
        return value

    # ---- decoding -------------------------------------------------------------------------------
    def decode(self, tp: Any, raw: Any, path: str) -> Any:
        """Check `raw` against `tp` entirely, then build it; MalformedMessage names the path."""
        self.check(tp, raw, path)
        return self._build(tp, raw, path)

    def check(self, tp: Any, raw: Any, path: str) -> None:
        inner = _optional_arg(tp)
        if inner is not None:
            if raw is None:
                return
            tp = inner
        schema = self._schemas.get(tp)
        if schema is not None:
            self._check_fields(tp, schema, raw, path)
        elif _is_enum(tp):
            if type(raw) not in (str, int) or raw not in tp._value2member_map_:
                raise MalformedMessage(f"{path}: expected {tp.__name__}, got {raw!r:.40}")
        elif tp in _SCALARS:
            if not isinstance(raw, _SCALARS[tp]) or (tp is not bool and isinstance(raw, bool)):
                raise MalformedMessage(
                    f"{path}: expected {tp.__name__}, got {type(raw).__name__}")
        else:
            self._check_sequence(tp, raw, path)

    def _check_fields(self, cls: type, schema: tuple[_Field, ...], raw: Any, path: str) -> None:
        if not isinstance(raw, dict):
            raise MalformedMessage(f"{path}: expected {cls.__name__}, got {type(raw).__name__}")
        names = {f.name for f in schema}
        unknown = set(raw) - names
        if unknown:
            raise MalformedMessage(f"{path}: unknown fields {sorted(map(str, unknown))[:8]}")
        for f in schema:
            if f.name in raw:
                self.check(f.hint, raw[f.name], f"{path}.{f.name}")
            elif f.is_required:
                raise MalformedMessage(f"{path}: missing field {f.name!r}")

    def _check_sequence(self, tp: Any, raw: Any, path: str) -> None:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if not isinstance(raw, list):
            raise MalformedMessage(f"{path}: expected {_type_name(tp)}, got {type(raw).__name__}")
        if origin is list or args[-1] is Ellipsis:
            item = args[0]
            if item is int and all(type(x) is int for x in raw):
                return  # the common case (token ids) without a call per item
            for i, x in enumerate(raw):
                self.check(item, x, f"{path}[{i}]")
            return
        if len(raw) != len(args):
            raise MalformedMessage(f"{path}: expected {len(args)} items, got {len(raw)}")
        for i, (a, x) in enumerate(zip(args, raw, strict=True)):
            self.check(a, x, f"{path}[{i}]")

    def _build(self, tp: Any, raw: Any, path: str) -> Any:
        """A checked value as `tp`: dataclasses through their constructors."""
        if raw is None:
            return None
        inner = _optional_arg(tp)
        if inner is not None:
            tp = inner
        schema = self._schemas.get(tp)
        if schema is not None:
            kwargs = {f.name: self._build(f.hint, raw[f.name], f"{path}.{f.name}")
                      for f in schema if f.name in raw}
            try:
                return tp(**kwargs)
            except Exception as e:  # the type's own validation, whatever it raises
                raise MalformedMessage(f"{path}: {e}") from None
        if _is_enum(tp):
            return tp(raw)
        if tp is float:
            return float(raw)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is None:
            return raw
        is_variadic = origin is list or args[-1] is Ellipsis
        item_types = args[:1] if is_variadic else args
        if all(a in _SCALARS and a is not float for a in item_types):
            items = raw  # already what they are (token ids, say): no call per item
        elif is_variadic:
            items = [self._build(args[0], x, f"{path}[{i}]") for i, x in enumerate(raw)]
        else:
            items = [self._build(a, x, f"{path}[{i}]")
                     for i, (a, x) in enumerate(zip(args, raw, strict=True))]
        return items if origin is list else tuple(items)


@dataclass(frozen=True)
class MessageFamily:
    """The message types one channel may carry (frozen dataclasses; field types as above)."""

    name: str
    types: tuple[type, ...]
    _codec: ValueCodec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_codec", ValueCodec(*self.types))

    def encode(self, msg: Any) -> bytes:
        if type(msg) not in self.types:
            raise TypeError(f"{type(msg).__name__} is not a message of channel {self.name}")
        fields = self._codec.encode(type(msg), msg)
        return msgpack.packb({"t": type(msg).__name__, "v": CTRL_VERSION, "d": fields},
                             use_bin_type=True)

    def decode(self, frame: bytes | memoryview) -> Any:
        if len(frame) > MAX_CTRL_BYTES:
            raise MalformedMessage(
                f"{self.name}: frame of {len(frame)} bytes exceeds {MAX_CTRL_BYTES}")
        try:
            raw = msgpack.unpackb(frame, raw=False, strict_map_key=True,
                                  max_bin_len=MAX_CTRL_BYTES, max_str_len=MAX_CTRL_BYTES)
        except Exception as e:  # msgpack raises several unrelated types
            raise MalformedMessage(f"{self.name}: not msgpack ({type(e).__name__}: {e})") from None
        if not isinstance(raw, dict) or set(raw) != {"t", "v", "d"}:
            raise MalformedMessage(f"{self.name}: frame is not a {{t, v, d}} envelope")
        if raw["v"] != CTRL_VERSION:
            raise MalformedMessage(
                f"{self.name}: version {raw['v']!r:.20}, this side speaks {CTRL_VERSION}")
        cls = next((t for t in self.types if t.__name__ == raw["t"]), None)
        if cls is None:
            raise MalformedMessage(f"{self.name}: unknown message type {raw['t']!r:.60}")
        return self._codec.decode(cls, raw["d"], cls.__name__)
