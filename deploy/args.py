"""Command-line flags generated from config dataclasses (`--max-model-len` from `max_model_len`)."""

from __future__ import annotations

import argparse
import dataclasses
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


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        is_required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if is_required:
            parser.add_argument(flag, type=kind, required=True, help=f.metadata["help"])
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=default, help=f.metadata["help"]
                                + (f" (default: {default})" if default is not None else ""))


def dataclass_from_args(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(ns).items() if k in names}
    values.update(overrides)
    return cls(**values)
