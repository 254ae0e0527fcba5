"""Reading the fields of a raw Kubernetes object (a dict, as parsed YAML or API JSON), with the path of each field
at hand so an error can name it (``spec.ports[1].port``); Kubernetes timestamps read and written
(:func:`parse_timestamp`, :func:`format_timestamp`, also used for the MCS conflict messages); and the conversion
errors every converter raises (``discovery.convert``, ``discovery.policy``, ``discovery.authz``).

Exception tree (this module; ``DiscoveryError`` lives in ``discovery.model``)::

    DiscoveryError
     +-- ConversionError       an object we understand but cannot convert; ``.field`` is the path inside it
          +-- UnsupportedKind  an (apiVersion, kind) that is not in ``discovery.convert.CONVERTERS``
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from discovery.model import DiscoveryError


class ConversionError(DiscoveryError, ValueError):
    """A Kubernetes object that cannot be converted. ``field`` is the path inside the object (may be empty)."""

    def __init__(self, field: str, message: str, *, obj: str = "") -> None:
        self.field = field
        self.reason = message
        self.obj = obj
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"{self.obj}: " if self.obj else ""
        at = f"{self.field}: " if self.field else ""
        return f"{where}{at}{self.reason}"

    def within(self, obj: str) -> ConversionError:
        """The same error, naming the object it occurred in (kind namespace/name)."""
        if self.obj:
            return self
        self.obj = obj
        self.args = (self._text(),)
        return self


class UnsupportedKind(ConversionError):
    """The object's (apiVersion, kind) is not in the table of kinds meshfed converts."""

    def __init__(self, api_version: str, kind: str) -> None:
        self.api_version = api_version
        self.kind = kind
        super().__init__(
            "kind", f"apiVersion {api_version!r} kind {kind!r} is not a kind meshfed understands (skipped)"
        )


def object_ref(obj: Mapping[str, Any]) -> str:
    """A readable reference to a raw object: ``Service default/reviews`` (best effort, never raises)."""
    kind = obj.get("kind") if isinstance(obj, Mapping) else None
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    name = ns = None
    if isinstance(meta, Mapping):
        name, ns = meta.get("name"), meta.get("namespace")
    kind_s = kind if isinstance(kind, str) and kind else "object"
    if isinstance(name, str) and name:
        return f"{kind_s} {ns if isinstance(ns, str) and ns else 'default'}/{name}"
    return kind_s


def type_of(obj: Any) -> tuple[str, str]:
    """``(apiVersion, kind)`` of a raw object; ConversionError when it is not an object with both fields."""
    if not isinstance(obj, Mapping):
        raise ConversionError("", f"expected a Kubernetes object (a mapping), got {type(obj).__name__}")
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not api_version:
        raise ConversionError("apiVersion", "required (a non-empty string)")
    if not isinstance(kind, str) or not kind:
        raise ConversionError("kind", "required (a non-empty string)")
    return api_version, kind


# Field helpers: each takes the path so errors can name it


def as_mapping(value: Any, path: str, *, required: bool = False) -> Mapping[str, Any]:
    if value is None:
        if required:
            raise ConversionError(path, "required")
        return {}
    if not isinstance(value, Mapping):
        raise ConversionError(path, f"must be a mapping, got {type(value).__name__}")
    return value


def as_list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConversionError(path, f"must be a list, got {type(value).__name__}")
    return value


def as_str(value: Any, path: str, *, required: bool = False, default: str = "") -> str:
    if value is None or value == "":
        if required:
            raise ConversionError(path, "required (a non-empty string)")
        return default
    if not isinstance(value, str):
        raise ConversionError(path, f"must be a string, got {value!r}")
    return value


def as_int(value: Any, path: str, *, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(path, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConversionError(path, f"{value} is out of range {low}..{high}")
    return value


def as_string_map(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    """A map of strings to strings (labels, annotations, selectors) as sorted pairs."""
    items = as_mapping(value, path)
    out = []
    for k, v in items.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConversionError(f"{path}.{k}", f"must map strings to strings, got {v!r}")
        out.append((k, v))
    return tuple(sorted(out))


def as_bool(value: Any, path: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConversionError(path, f"must be true or false, got {value!r}")
    return value


def parse_timestamp(value: Any, path: str) -> datetime:
    """An RFC 3339 timestamp (string, or the datetime YAML already made of it) as an aware UTC datetime."""
    if isinstance(value, datetime):
        stamp = value
    elif isinstance(value, str) and value:
        text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
        try:
            stamp = datetime.fromisoformat(text)
        except ValueError:
            raise ConversionError(path, f"{value!r} is not an RFC 3339 timestamp like 2026-01-01T00:00:00Z") from None
    else:
        raise ConversionError(path, "required (an RFC 3339 timestamp like 2026-01-01T00:00:00Z)")
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.astimezone(UTC)


def format_timestamp(stamp: datetime) -> str:
    """The Kubernetes form of a timestamp: RFC 3339, UTC, whole seconds, ``Z``."""
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
