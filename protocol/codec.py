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

Bounds (protocol/bounds.py): a field may carry ranges and lengths in its metadata, checked with
its type; a bound may name a limit only the receiver knows (`max_model_len`, `vocab_size`),
given to `decode(..., limits=...)`. So a worker refuses a prompt id >= its vocabulary or a
prompt longer than its `--max-model-len` as `MalformedMessage` naming the field, before any
handler runs. Below the codec, msgpack refuses any str, array or map longer than
`MAX_STR_LEN` / `MAX_ARRAY_LEN` / `MAX_MAP_LEN` while it reads, and the sockets refuse frames
over their channel's size (protocol/channel.py: `ZMQ_MAXMSGSIZE`).
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from protocol.bounds import BOUND_KEYS, MAX_ID_LEN, Bound, check_bounds

CTRL_VERSION = 1
MAX_CTRL_BYTES = 64 << 20
MAX_STR_LEN = 1 << 16  # any str on the control plane (ids, addresses, reasons, plan lines)
MAX_ARRAY_LEN = 1 << 21  # any list (token ids up to a 2M-token context)
MAX_MAP_LEN = 64  # maps are dataclasses: a few fields each


class MalformedMessage(ValueError):
    """A control frame that is not a valid message of the channel's family. `request_id` is
    the request it names when the envelope could be read that far (so the receiver can fail
    that request alone, with this error), else None."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


_SCALARS: Mapping[type, tuple[type, ...]] = types.MappingProxyType(
    {int: (int,), float: (float, int), str: (str,), bool: (bool,), bytes: (bytes,)})
_NONE = type(None)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


class _Kind(enum.Enum):
    OPTIONAL = "X | None"
    LIST = "list[X]"
    TUPLE = "tuple[X, ...]"
    FIXED_TUPLE = "tuple[X, Y]"
    ENUM = "enum"
    SCALAR = "scalar"
    DATACLASS = "dataclass"


@dataclass(frozen=True)
class _Shape:
    """One field type, taken apart once (when the codec is built), not at every value."""

    kind: _Kind
    args: tuple[Any, ...] = ()
    is_plain: bool = False  # a list / tuple of plain scalars: msgpack carries it as it is
    is_exact: bool = False  # ... and decoding builds it as it comes (no float among them)


def _shape_of(tp: Any, where: str) -> _Shape:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        others = tuple(a for a in args if a is not _NONE)
        if len(args) != 2 or len(others) != 1:
            raise TypeError(f"{where}: {_type_name(tp)}: only `X | None` unions travel")
        return _Shape(_Kind.OPTIONAL, others)
    if origin is list and len(args) == 1:
        kind, items = _Kind.LIST, args
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        kind, items = _Kind.TUPLE, args[:1]
    elif origin is tuple and args and Ellipsis not in args:
        kind, items = _Kind.FIXED_TUPLE, args
    elif _is_enum(tp):
        return _Shape(_Kind.ENUM)
    elif tp in _SCALARS:
        return _Shape(_Kind.SCALAR)
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not tp.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{where}: {tp.__name__} is not a frozen dataclass")
        return _Shape(_Kind.DATACLASS)
    else:
        raise TypeError(f"{where}: {_type_name(tp)} cannot travel on the control plane")
    is_plain = all(a in _SCALARS for a in items)
    return _Shape(kind, items, is_plain, is_plain and float not in items)


class _Bad(Exception):
    """A value that does not fit its type; the path to it is assembled on the way out, so
    nothing is formatted while values are good."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message, self.steps = message, []

    def at(self, step: str) -> _Bad:
        self.steps.append(step)
        return self

    def where(self, root: str) -> str:
        return root + "".join(reversed(self.steps))


@dataclass(frozen=True)
class _Field:
    name: str
    hint: Any
    is_required: bool
    bounds: tuple[tuple[str, Bound], ...] = ()  # (key, bound) from the field's metadata


def _fields_of(cls: type) -> tuple[_Field, ...]:
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:
        raise TypeError(f"{cls.__name__}: a field type does not resolve ({e})") from None
    return tuple(
        _Field(f.name, hints[f.name],
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
               tuple((k, f.metadata[k]) for k in BOUND_KEYS if k in f.metadata))
        for f in dataclasses.fields(cls) if f.init)


class ValueCodec:
    """Encodes and decodes values of the field types `roots` (frozen dataclasses, or any type
    above) and of every type reachable from them, all checked here: an unsupported type is a
    TypeError when the codec is built, not when a value meets it."""

    def __init__(self, *roots: Any) -> None:
        self._shapes: dict[Any, _Shape] = {}
        self._fields: dict[type, tuple[_Field, ...]] = {}
        self._names: dict[type, frozenset[str]] = {}
        for tp in roots:
            self._register(tp, _type_name(tp))

    def _register(self, tp: Any, where: str) -> None:
        if tp in self._shapes:
            return  # also ends a cycle
        shape = self._shapes[tp] = _shape_of(tp, where)
        if shape.kind is _Kind.DATACLASS:
            self._fields[tp] = _fields_of(tp)
            self._names[tp] = frozenset(f.name for f in self._fields[tp])
            for f in self._fields[tp]:
                self._register(f.hint, f"{where}.{f.name}")
        for a in shape.args:
            self._register(a, where)

    # ---- encoding -------------------------------------------------------------------------------
    def encode(self, tp: Any, value: Any) -> Any:
        """`value` (of type `tp`, one of the roots) as plain msgpack values."""
        if tp not in self._shapes:
            raise TypeError(f"{_type_name(tp)} is not a type of this codec")
        return self._encode(tp, value)

    def _encode(self, tp: Any, value: Any) -> Any:
        if value is None:
            return None
        shape = self._shapes[tp]
        kind = shape.kind
        if kind is _Kind.OPTIONAL:
            return self._encode(shape.args[0], value)
        if kind is _Kind.DATACLASS:
            if type(value) is not tp:
                raise TypeError(f"expected {tp.__name__}, got {type(value).__name__}")
            return {f.name: self._encode(f.hint, getattr(value, f.name))
                    for f in self._fields[tp]}
        if kind is _Kind.ENUM:
            return value.value
        if kind is _Kind.SCALAR or shape.is_plain:
            return value  # msgpack packs a list or tuple of plain values as it is
        if kind is _Kind.FIXED_TUPLE:
            return [self._encode(a, v) for a, v in zip(shape.args, value, strict=True)]
        return [self._encode(shape.args[0], v) for v in value]

    # ---- decoding -------------------------------------------------------------------------------
    def decode(self, tp: Any, raw: Any, path: str,
               limits: Mapping[str, int] | None = None) -> Any:
        """Check `raw` against `tp` (one of the roots) entirely, bounds included (named ones
        from `limits`), then build it; MalformedMessage names the path from `path`."""
        if tp not in self._shapes:
            raise TypeError(f"{_type_name(tp)} is not a type of this codec")
        try:
            self._check(tp, raw, limits or {})
            return self._build(tp, raw)
        except _Bad as e:
            raise MalformedMessage(f"{e.where(path)}: {e.message}") from None

    def _check(self, tp: Any, raw: Any, limits: Mapping[str, int]) -> None:
        shape = self._shapes[tp]
        if shape.kind is _Kind.OPTIONAL:
            if raw is None:
                return
            tp = shape.args[0]
            shape = self._shapes[tp]
        kind = shape.kind
        if kind is _Kind.SCALAR:
            if not isinstance(raw, _SCALARS[tp]) or (tp is not bool and isinstance(raw, bool)):
                raise _Bad(f"expected {tp.__name__}, got {type(raw).__name__}")
        elif kind is _Kind.ENUM:
            if type(raw) not in (str, int) or raw not in tp._value2member_map_:
                raise _Bad(f"expected {tp.__name__}, got {raw!r:.40}")
        elif kind is _Kind.DATACLASS:
            self._check_fields(tp, raw, limits)
        else:
            self._check_items(tp, shape, raw, limits)

    def _check_fields(self, cls: type, raw: Any, limits: Mapping[str, int]) -> None:
        if not isinstance(raw, dict):
            raise _Bad(f"expected {cls.__name__}, got {type(raw).__name__}")
        if not self._names[cls].issuperset(raw):
            raise _Bad(f"unknown fields {sorted(map(str, set(raw) - self._names[cls]))[:8]}")
        for f in self._fields[cls]:
            if f.name in raw:
                try:
                    self._check(f.hint, raw[f.name], limits)
                    if f.bounds and (bad := check_bounds(f.bounds, raw[f.name], limits)):
                        raise _Bad(bad)
                except _Bad as e:
                    raise e.at(f".{f.name}") from None
            elif f.is_required:
                raise _Bad(f"missing field {f.name!r}")

    def _check_items(self, tp: Any, shape: _Shape, raw: Any, limits: Mapping[str, int]) -> None:
        if not isinstance(raw, list):
            raise _Bad(f"expected {_type_name(tp)}, got {type(raw).__name__}")
        if shape.kind is _Kind.FIXED_TUPLE:
            if len(raw) != len(shape.args):
                raise _Bad(f"expected {len(shape.args)} items, got {len(raw)}")
            pairs = zip(shape.args, raw, strict=True)
        else:
            item = shape.args[0]
            if item is int and all(type(x) is int for x in raw):
                return  # the common case (token ids) without a call per item
            pairs = ((item, x) for x in raw)
        for i, (a, x) in enumerate(pairs):
            try:
                self._check(a, x, limits)
            except _Bad as e:
                raise e.at(f"[{i}]") from None

    def _build(self, tp: Any, raw: Any) -> Any:
        """A checked value as `tp`: dataclasses through their constructors."""
        if raw is None:
            return None
        shape = self._shapes[tp]
        if shape.kind is _Kind.OPTIONAL:
            tp = shape.args[0]
            shape = self._shapes[tp]
        kind = shape.kind
        if kind is _Kind.DATACLASS:
            return self._build_dataclass(tp, raw)
        if kind is _Kind.ENUM:
            return tp(raw)
        if kind is _Kind.SCALAR:
            return float(raw) if tp is float else raw
        if shape.is_exact:
            items = raw  # already what they are (token ids, say): no call per item
        elif kind is _Kind.FIXED_TUPLE:
            items = [self._build_item(a, x, i)
                     for i, (a, x) in enumerate(zip(shape.args, raw, strict=True))]
        else:
            items = [self._build_item(shape.args[0], x, i) for i, x in enumerate(raw)]
        return items if kind is _Kind.LIST else tuple(items)

    def _build_item(self, tp: Any, raw: Any, index: int) -> Any:
        try:
            return self._build(tp, raw)
        except _Bad as e:
            raise e.at(f"[{index}]") from None

    def _build_dataclass(self, cls: type, raw: dict[str, Any]) -> Any:
        kwargs = {}
        for f in self._fields[cls]:
            if f.name in raw:
                try:
                    kwargs[f.name] = self._build(f.hint, raw[f.name])
                except _Bad as e:
                    raise e.at(f".{f.name}") from None
        try:
            return cls(**kwargs)
        except Exception as e:  # the type's own validation, whatever it raises
            raise _Bad(str(e)) from None


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

    def decode(self, frame: bytes | memoryview, limits: Mapping[str, int] | None = None) -> Any:
        """The message in `frame`, every field checked (bounds named in `limits` too);
        MalformedMessage otherwise, carrying the request id when the frame names one."""
        if len(frame) > MAX_CTRL_BYTES:
            raise MalformedMessage(
                f"{self.name}: frame of {len(frame)} bytes exceeds {MAX_CTRL_BYTES}")
        was_collecting = gc.isenabled()
        gc.disable()  # a frame of empty containers would run the collector again and again
        try:
            raw = msgpack.unpackb(frame, raw=False, strict_map_key=True,
                                  max_bin_len=MAX_CTRL_BYTES, max_str_len=MAX_STR_LEN,
                                  max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN,
                                  max_ext_len=0)
        except Exception as e:  # msgpack raises several unrelated types
            raise MalformedMessage(f"{self.name}: not msgpack ({type(e).__name__}: {e})") from None
        finally:
            if was_collecting:
                gc.enable()
        if not isinstance(raw, dict) or set(raw) != {"t", "v", "d"}:
            raise MalformedMessage(f"{self.name}: frame is not a {{t, v, d}} envelope")
        rid = raw["d"].get("request_id") if isinstance(raw["d"], dict) else None
        rid = rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LEN else None
        if raw["v"] != CTRL_VERSION:
            raise MalformedMessage(
                f"{self.name}: version {raw['v']!r:.20}, this side speaks {CTRL_VERSION}", rid)
        cls = next((t for t in self.types if t.__name__ == raw["t"]), None)
        if cls is None:
            raise MalformedMessage(f"{self.name}: unknown message type {raw['t']!r:.60}", rid)
        try:
            return self._codec.decode(cls, raw["d"], cls.__name__, limits)
        except MalformedMessage as e:
            raise MalformedMessage(str(e), rid) from None
