"""A protobuf message packed into ``google.protobuf.Any``, and the type URL that names a message: written once for
the generators, the traffic and RBAC builders and the telemetry filters."""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2


def pack(message: Any) -> Any:
    """Wrap ``message`` in a ``google.protobuf.Any`` (type URL ``type.googleapis.com/<full name>``)."""
    wrapped = any_pb2.Any()
    wrapped.Pack(message)
    return wrapped


def type_url(message_class: Any) -> str:
    return f"type.googleapis.com/{message_class.DESCRIPTOR.full_name}"
