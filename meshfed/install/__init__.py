"""``meshfed install``: Kubernetes manifests for a clusterset, and applying them cluster by cluster.

Pure core: :mod:`.crds` (the MCS CustomResourceDefinitions as data) and :mod:`.render` (manifests from a
ClusterSet, CA material and options; no IO). IO edges: :mod:`.cafiles` (root and intermediate CA directories on
disk, through :mod:`federation.trust.store`), :mod:`.output` (the render directory and its plan) and
:mod:`.apply` (the ``kubernetes`` client: create-or-replace, readiness waits).

Exception tree::

    InstallError (Exception)
     +-- RenderError        options that cannot make manifests (names the option or cluster)
     +-- PlanError          a render directory that cannot be applied (names the file)
     +-- ApplyError         the API server refused or a wait timed out (names cluster, object, API error)
"""

from __future__ import annotations


class InstallError(Exception):
    """Base of every install error; the message is complete and names what failed."""


class RenderError(InstallError, ValueError):
    """The options or the clusterset cannot be rendered into manifests."""


class PlanError(InstallError):
    """A render directory is missing, incomplete or was edited into something unreadable."""


class ApplyError(InstallError):
    """Applying to a cluster failed: ``cluster``, ``obj`` (Kind ns/name) and the API server's ``reason``."""

    def __init__(self, cluster: str, obj: str, action: str, reason: str) -> None:
        self.cluster = cluster
        self.obj = obj
        self.action = action
        self.reason = reason
        super().__init__(f"cluster {cluster}: {action} {obj}: {reason}")


__all__ = ["ApplyError", "InstallError", "PlanError", "RenderError"]
