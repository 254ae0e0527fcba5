"""Run states written by hand in unit tests: a test names only the fields it is about and :func:`state_from`
fills every other required field with an empty value of its type, then decodes the result with the real codec
(:func:`meshfed.runstate.decode`, strict), so an unknown or mistyped field in a test's document still fails."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from meshfed import runstate
from meshfed.runstate import RunState

_EMPTY: dict[Any, Any] = {str: "", int: 0, float: 0.0, bool: False}


def _complete(cls: type, doc: Mapping[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = dict(doc)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name not in out:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                out[f.name] = _empty(tp)
            continue
        out[f.name] = _fill(tp, out[f.name])
    return out


def _fill(tp: Any, value: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return _complete(tp, value)  # type: ignore[arg-type]
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, list):
        return [_fill(typing.get_args(tp)[0], v) for v in value]
    if origin in (dict, Mapping) and isinstance(value, Mapping) and typing.get_args(tp):
        return {k: _fill(typing.get_args(tp)[1], v) for k, v in value.items()}
    return value


def _empty(tp: Any) -> Any:
    if tp in _EMPTY:
        return _EMPTY[tp]
    if typing.get_origin(tp) is tuple:
        return []
    if dataclasses.is_dataclass(tp):
        return _complete(tp, {})  # type: ignore[arg-type]
    raise TypeError(f"no empty value for {tp!r}")


def state_from(doc: Mapping[str, Any]) -> RunState:
    """``doc`` (part of a state.json) as a whole :class:`RunState`."""
    return runstate.decode(_complete(RunState, doc), what="test state")
