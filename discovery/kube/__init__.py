"""The Kubernetes source: one cluster's Services, EndpointSlices and ServiceExports, and its Istio traffic and
authorization policies (VirtualService, DestinationRule, AuthorizationPolicy), listed and watched through the
official ``kubernetes`` client, converted at the boundary by ``discovery.convert``.

The client is blocking, so each watched kind runs a *reflector* on its own worker thread: list (which gives a
resourceVersion), then watch from that version with bookmarks, resume from the newest version seen when a watch
ends, relist when the server answers 410 Gone (an ``ERROR`` event or an HTTP 410), and back off with jitter on
any other failure (bounded, and cut short at once when the source stops). Reflectors convert each object on
their thread and hand the converted values to the event loop with ``call_soon_threadsafe``; the loop only keeps
the latest value per object and, when something changed, assembles a whole :class:`ClusterSnapshot` (in a
thread) and yields it. Nothing here blocks the event loop.

The core kinds are indexed by service key, so a change rebuilds only the services it touches. The policy kinds
are not per service: they land in ``ClusterSnapshot.extras``, sorted by (kind, namespace, name), rebuilt only when
one of them changed. Custom kinds (ServiceExport, the Istio kinds) may not be served at all (CRD not installed):
then the reflector reports no objects of that kind, so the snapshot is not held back, and keeps checking until the
kind appears. The Istio kinds are tried at each served version in turn (``v1`` first, then the older betas).

:class:`KubeSource` has the same shape as :class:`discovery.manifests.ManifestSource`: ``watch()`` is an async
iterator of :class:`discovery.source.LoadResult` (the snapshot in force plus the problems found), so the
control plane consumes either through the :class:`discovery.source.ClusterSource` protocol. An object that fails
conversion is reported as a problem naming the object and field, and the last good version of that object stays
in force.

The files, one job each: ``errors`` (the exception tree, and the client's errors mapped at the edge), ``client``
(kubeconfig loading and the ServiceExport writes, also used by ``meshfed export --context``), ``reflector``
(list and watch of one kind), ``source`` (:class:`KubeSource`), ``status`` (the ServiceExport conditions written
back). The exception tree is drawn in ``errors``.
"""

from discovery.kube.client import (
    MCS_GROUP,
    MCS_VERSION,
    MCS_VERSIONS,
    SERVICE_EXPORTS,
    create_service_export,
    create_service_export_sync,
    delete_service_export,
    delete_service_export_sync,
    get_service_export_sync,
    load_api_client,
    read_cluster_properties_sync,
    served_mcs_version_sync,
    service_exists_sync,
    sync_webhook_ca_bundle_sync,
)
from discovery.kube.errors import (
    KubeAlreadyExists,
    KubeApiError,
    KubeConfigError,
    KubeError,
    KubeGone,
    KubeNotFound,
    KubeUnavailable,
    api_error,
)
from discovery.kube.reflector import EXTRA_KINDS, KINDS, Backoff, Reflector, ReflectorStats, WatchedKind
from discovery.kube.source import KubeSource
from discovery.kube.status import ExportStatusWriter, ImportWriter, SliceWriter, export_status_body

__all__ = [
    "EXTRA_KINDS",
    "KINDS",
    "MCS_GROUP",
    "MCS_VERSION",
    "MCS_VERSIONS",
    "SERVICE_EXPORTS",
    "Backoff",
    "ExportStatusWriter",
    "ImportWriter",
    "KubeAlreadyExists",
    "KubeApiError",
    "KubeConfigError",
    "KubeError",
    "KubeGone",
    "KubeNotFound",
    "KubeSource",
    "KubeUnavailable",
    "Reflector",
    "ReflectorStats",
    "SliceWriter",
    "WatchedKind",
    "api_error",
    "create_service_export",
    "create_service_export_sync",
    "delete_service_export",
    "delete_service_export_sync",
    "export_status_body",
    "get_service_export_sync",
    "load_api_client",
    "read_cluster_properties_sync",
    "served_mcs_version_sync",
    "service_exists_sync",
    "sync_webhook_ca_bundle_sync",
]
