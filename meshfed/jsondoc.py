"""Typed values <-> JSON for meshfed's own documents (a control plane's ``/status``, a local run's state): one
codec driven by the frozen dataclasses that describe a document, so a document has one definition that both its
writer and its readers use.

- :func:`encode` turns a value into JSON-shaped data: a dataclass into an object with its fields in declaration
  order, tuples into lists, mappings into objects. A dataclass may leave fields out of its JSON by naming them in
  a ``json_omitted()`` method (a field that is only present in some states).
- :func:`decode` is strict: an object must be an object, a field of an unknown name is an error (a typo must not be
  dropped silently), a value of the wrong type is an error (``true`` is not a number, ``null`` only where the
  field may be None), and a field left out takes its default (an error when it has none). Every error names the
  document and the path of the offending value (``status of east: services[2].ready: expected an integer``).

Supported field types: ``str``, ``int``, ``float`` (an integer is accepted), ``bool``, ``X | None``,
``tuple[X, ...]``, ``Mapping[str, X]`` and ``dict[str, X]``, nested dataclasses, and ``Any`` (any JSON, kept as is).

Errors (this module)::

    DocumentError (ValueError)     a JSON value that does not decode; ``what`` names the document, ``path`` the value
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

T = TypeVar("T")


class DocumentError(ValueError):
    """A JSON value that does not decode into its typed value."""

    def __init__(self, what: str, path: str, message: str) -> None:
        super().__init__(f"{what}: {path or 'the document'}: {message}")
        self.what, self.path, self.message = what, path, message


def encode(value: Any) -> Any:
    """``value`` (a dataclass, or what one holds) as JSON-shaped data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        omitted = value.json_omitted() if hasattr(value, "json_omitted") else ()
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in omitted}
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    return value


def dumps(value: Any) -> str:
    return json.dumps(encode(value))


def decode(cls: type[T], data: Any, *, what: str) -> T:
    """``data`` (parsed JSON) as a ``cls`` (a dataclass); raises :class:`DocumentError` naming ``what`` and the path."""
    value: T = _decode(cls, data, what, "")
    return value


def loads(cls: type[T], text: str | bytes, *, what: str) -> T:
    """Parse and :func:`decode` a JSON document."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DocumentError(what, "", f"not JSON: {exc}") from exc
    return decode(cls, data, what=what)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _decode(tp: Any, data: Any, what: str, path: str) -> Any:
    if tp is Any:
        return data
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None:
            if type(None) in args:
                return None
            raise DocumentError(what, path, "must not be null")
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported union {tp!r}")
        return _decode(rest[0], data, what, path)
    if data is None:
        raise DocumentError(what, path, "must not be null")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _decode_object(tp, data, what, path)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported tuple {tp!r}")
        if not isinstance(data, list):
            raise DocumentError(what, path, f"expected a list, got {_json_kind(data)}")
        return tuple(_decode(args[0], v, what, f"{path}[{i}]") for i, v in enumerate(data))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        args = typing.get_args(tp) or (str, Any)
        if not isinstance(data, dict):
            raise DocumentError(what, path, f"expected an object, got {_json_kind(data)}")
        return {str(k): _decode(args[1], v, what, _join(path, str(k))) for k, v in data.items()}
    if tp is bool:
        if not isinstance(data, bool):
            raise DocumentError(what, path, f"expected true or false, got {_json_kind(data)}")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise DocumentError(what, path, f"expected an integer, got {_json_kind(data)}")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise DocumentError(what, path, f"expected a number, got {_json_kind(data)}")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise DocumentError(what, path, f"expected a string, got {_json_kind(data)}")
        return data
    raise TypeError(f"unsupported type {tp!r} at {path}")


def _decode_object(cls: type, data: Any, what: str, path: str) -> Any:
    if not isinstance(data, dict):
        raise DocumentError(what, path, f"expected an object, got {_json_kind(data)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DocumentError(what, _join(path, unknown[0]), "unknown field")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _decode(hints[name], data[name], what, _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise DocumentError(what, _join(path, name), "missing")
    return cls(**values)


def _json_kind(data: Any) -> str:
    if data is None:
        return "null"
    if isinstance(data, bool):
        return "true or false"
    for tp, kind in _KINDS.items():
        if isinstance(data, tp):
            return kind
    if isinstance(data, list):
        return "a list"
    if isinstance(data, dict):
        return "an object"
    return type(data).__name__
