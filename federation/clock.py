"""The one clock: the current time, timezone-aware, in UTC. Parts that must be testable at a chosen instant take
a ``now`` argument or a ``clock`` callable defaulting to :func:`utcnow`."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
