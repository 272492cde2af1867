"""Command-line flags generated from the config dataclasses' field metadata (`config.flag`).

    field(default=2, metadata=flag("--io-threads", "I/O threads"))
        -> --io-threads IO_THREADS    I/O threads (default: 2)

The flag's type comes from the field's: a Literal gives its values as choices, a `bool` takes
on/off, an optional `bool` is a switch. Every generated flag defaults to absent, so `given` holds
only the flags on the command line and `over(config, args)` replaces only those fields: a flag left
out never overwrites a value from a spec file, and each default is written once, in its dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

from flexemr.config import Flag, parse_bytes

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Config = TypeVar("Config", bound="DataclassInstance")


def _flags(cls: type) -> list[tuple[dataclasses.Field[Any], Flag, Any]]:
    """The fields of `cls` that have a flag, with it and the field's type without None."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("flag")
        if meta is not None:
            kinds = [k for k in get_args(hints[f.name]) if k is not type(None)]
            optional = get_origin(hints[f.name]) in (typing.Union, types.UnionType)
            found.append((f, meta, kinds[0] if optional else hints[f.name]))
    return found


def _dest(meta: Flag) -> str:
    return meta.name.removeprefix("--").replace("-", "_")


def _shown(value: Any, meta: Flag) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value * 1000 if meta.unit == "ms" else value)


def _precise(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, its ValueError's message shown by argparse (not "invalid parse value")."""

    def parsed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parsed


def add_flags(parser: argparse.ArgumentParser, cls: type, note: str = "") -> None:
    """A flag for each field of dataclass `cls` that has one; `note` follows each default in --help
    (e.g. ", or the spec file's")."""
    for f, meta, kind in _flags(cls):
        options: dict[str, Any] = {"default": argparse.SUPPRESS}
        if kind is bool and f.default is None:
            options["action"] = "store_true"
        elif kind is bool:
            options["choices"] = ("on", "off")
        elif get_origin(kind) is Literal:
            options["choices"] = get_args(kind)
        else:
            # A type with a `parse` classmethod (CacheMode) is written as text, e.g. fixed:64MiB.
            parse = parse_bytes if meta.unit == "bytes" else getattr(kind, "parse", None)
            options["type"] = kind if parse is None else _precise(parse)
        shown = "" if f.default is None else f" (default: {_shown(f.default, meta)}{note})"
        parser.add_argument(meta.name, help=(meta.help + shown).replace("%", "%%"), **options)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` whose flags are in `args`, as the field values."""
    values = {}
    for f, meta, kind in _flags(cls):
        if hasattr(args, _dest(meta)):
            value = getattr(args, _dest(meta))
            if kind is bool and isinstance(value, str):
                value = value == "on"
            values[f.name] = value / 1000 if meta.unit == "ms" else value
    return values


def over(config: Config, args: argparse.Namespace) -> Config:
    """`config` with the fields whose flags were given replaced (validated anew)."""
    return dataclasses.replace(config, **given(args, type(config)))
