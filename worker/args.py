"""Command-line flags generated from config dataclasses (`--max-model-len` from `max_model_len`).

A field's metadata may name a `parse` function for its flag (e.g. `parse_seconds`: `--slo-ttft
500ms`). A field whose type is itself a config dataclass (`ServeConfig.kv: KvTransportConfig`) adds
that dataclass's flags under their own names, and `dataclass_from_args` builds it back whole, so a
nested config is defined once and parsed, printed (`dataclass_to_args`) and passed on as one.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _flag_type(tp: Any) -> Any:
    """The argparse type of a field annotation such as `int | None` or `int | str | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str if str in args else args[0]
    return tp


def parse_seconds(text: str) -> float:
    """'0.25', '0.25s' or '250ms' -> 0.25 (the duration syntax of every `pdserve` flag)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|s)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected seconds like 0.5, 0.5s or 500ms, "
                                         f"got {text!r}")
    return float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)


def _nested(tp: Any) -> type | None:
    """The config dataclass a field holds whole, or None for a plain flag."""
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type,
                       skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        inner = _nested(hints[f.name])
        if inner is not None:
            add_dataclass_args(parser, inner, skip)
            continue
        if "help" not in f.metadata:
            continue
        kind = f.metadata.get("parse") or _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        is_required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = f.metadata["help"]
        if is_required:
            parser.add_argument(_flag(f.name), type=kind, required=True, help=help_text)
        elif kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        else:
            suffix = f" (default: {default})" if default is not None else ""
            parser.add_argument(_flag(f.name), *f.metadata.get("aliases", ()), type=kind,
                                default=default, help=help_text + suffix)


def dataclass_from_args(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    hints = typing.get_type_hints(cls)
    given = vars(ns)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        inner = _nested(hints[f.name])
        if inner is not None:
            values[f.name] = dataclass_from_args(inner, ns)
        elif f.name in given:
            values[f.name] = given[f.name]
    values.update(overrides)
    return cls(**values)


def dataclass_to_args(config: Any) -> list[str]:
    """The flags that `dataclass_from_args` parses back into `config` (its flag fields only)."""
    out: list[str] = []
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if _nested(hints[f.name]) is not None:
            out += dataclass_to_args(value)
        elif "help" not in f.metadata or value is None:
            continue
        elif isinstance(value, bool):
            out.append(_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            out += [_flag(f.name), str(value)]
    return out
