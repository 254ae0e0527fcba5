"""The discovery source layer: what every source of one cluster's objects gives the control plane.

A source (:class:`ClusterSource`) is one cluster and an async iterator of :class:`LoadResult`: a whole
:class:`ClusterSnapshot` (model values, replaced whole, with an opaque version) and the problems found on the way.
Two sources implement it: the manifest files of a clusterset (``discovery.manifests.ManifestSource``, local runs)
and the Kubernetes API (``discovery.kube.KubeSource``). Both report bad content as :class:`ManifestProblem` rows and
keep the last good state in force; neither raises for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from discovery.model import ClusterId, Service, ServiceExport, ServiceKey

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True, slots=True)
class ManifestProblem:
    """Something wrong in a manifest file (or, from the Kubernetes source, an object: ``file`` is
    ``kubernetes:<cluster>``). ``document`` is 1-based (0: the file as a whole)."""

    file: str
    document: int
    field: str
    message: str
    severity: str = ERROR

    def __str__(self) -> str:
        where = self.file
        if self.document:
            where += f": document {self.document}"
        if self.field:
            where += f": {self.field}"
        return f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """What one cluster's objects (its manifests, or its API server) hold right now, as model values. Replaced
    whole; ``version`` is opaque and changes exactly when the accepted content changes."""

    cluster: ClusterId
    services: Mapping[ServiceKey, Service] = field(default_factory=dict)
    exports: Mapping[ServiceKey, ServiceExport] = field(default_factory=dict)
    unsupported: Mapping[ServiceKey, str] = field(default_factory=dict)
    """Services that exist but cannot be exported (ExternalName), with why."""
    extras: tuple[Any, ...] = ()
    """Converted objects of the other kinds (policies, routes), in file and document order."""
    version: str = ""


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The snapshot in force after a load, and the problems found (errors keep the last good file or object in
    force)."""

    snapshot: ClusterSnapshot
    problems: tuple[ManifestProblem, ...] = ()

    @property
    def errors(self) -> tuple[ManifestProblem, ...]:
        return tuple(p for p in self.problems if p.severity == ERROR)

    @property
    def warnings(self) -> tuple[ManifestProblem, ...]:
        return tuple(p for p in self.problems if p.severity == WARNING)


class ClusterSource(Protocol):
    """What a discovery source offers the control plane: one cluster, and an async iterator of whole
    snapshots (with the problems found), the first as soon as the initial state is known."""

    cluster: ClusterId

    def watch(self) -> AsyncIterator[LoadResult]: ...
