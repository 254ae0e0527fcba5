"""The API client and the writes meshfed makes: :func:`load_api_client` (kubeconfig and context, or the pod's
service account: the one place kubeconfig is loaded) and the ServiceExport create, delete and get that the
control plane and ``meshfed export --context`` use."""


from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException

from discovery import clusterid, convert
from discovery.kube.errors import KubeAlreadyExists, KubeConfigError, KubeNotFound, api_request
from discovery.model import ServiceKey

log = logging.getLogger("meshfed.discovery.kube")

MCS_GROUP = convert.MCS_GROUP
MCS_VERSION = convert.MCS_VERSION
MCS_VERSIONS = convert.MCS_VERSIONS
SERVICE_EXPORTS = "serviceexports"




# ------------------------------------------------------------------------------------------------------ config


def load_api_client(
    *, kubeconfig: Path | str | None = None, context: str | None = None, in_cluster: bool = False
) -> k8s_client.ApiClient:
    """An ApiClient for ``context`` in ``kubeconfig`` (the client's defaults, ``$KUBECONFIG`` or
    ``~/.kube/config``, when None), or, with ``in_cluster``, for the pod's service account. Reads files: call it
    from a thread inside async code."""
    if in_cluster:
        try:
            configuration = k8s_client.Configuration()
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (ConfigException, OSError) as exc:
            raise KubeConfigError(f"in-cluster configuration: {exc}") from exc
        return k8s_client.ApiClient(configuration)
    try:
        api: k8s_client.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig) if kubeconfig is not None else None, context=context
        )
        return api
    except (ConfigException, OSError, ValueError, TypeError) as exc:
        where = str(kubeconfig) if kubeconfig is not None else "the default kubeconfig"
        ctx = f" context {context!r}" if context else ""
        raise KubeConfigError(f"{where}{ctx}: {exc}") from exc



# ------------------------------------------------------------------------------------------------------ exports


def served_mcs_version_sync(api: k8s_client.ApiClient) -> str:
    """The MCS API version to write: the newest of :data:`MCS_VERSIONS` the API server's discovery lists for the
    group (v1beta1 where served, else v1alpha1); the newest when the group is not served at all (the request
    that follows then fails naming the missing resource)."""
    apis = k8s_client.ApisApi(api)
    listing = api_request("discover the API groups", apis.get_api_versions)
    served: set[str] = set()
    for group in getattr(listing, "groups", None) or ():
        if group.name == MCS_GROUP:
            served = {v.version for v in group.versions or ()}
    return next((v for v in MCS_VERSIONS if v in served), MCS_VERSIONS[0])


def _export_body(key: ServiceKey, version: str) -> dict[str, Any]:
    body = convert.service_export_object(key, datetime.now(UTC), version=version)
    body["metadata"].pop("creationTimestamp", None)  # the API server sets it
    return body


def create_service_export_sync(api: k8s_client.ApiClient, key: ServiceKey, *, exist_ok: bool = False) -> bool:
    """Create the ServiceExport for ``key``, at the MCS version the cluster serves (:func:`served_mcs_version_sync`);
    False when it existed already and ``exist_ok``."""
    custom = k8s_client.CustomObjectsApi(api)
    request = f"create ServiceExport {key.namespace}/{key.name}"
    version = served_mcs_version_sync(api)
    try:
        api_request(request, lambda: custom.create_namespaced_custom_object(MCS_GROUP, version, key.namespace,
                                                                         SERVICE_EXPORTS, _export_body(key, version)))
    except KubeAlreadyExists:
        if exist_ok:
            return False
        raise
    log.info("service_export_created namespace=%s name=%s", key.namespace, key.name)
    return True


def delete_service_export_sync(api: k8s_client.ApiClient, key: ServiceKey, *, missing_ok: bool = False) -> bool:
    """Delete the ServiceExport for ``key``; False when there was none and ``missing_ok``."""
    custom = k8s_client.CustomObjectsApi(api)
    request = f"delete ServiceExport {key.namespace}/{key.name}"
    version = served_mcs_version_sync(api)
    try:
        api_request(request, lambda: custom.delete_namespaced_custom_object(MCS_GROUP, version, key.namespace,
                                                                         SERVICE_EXPORTS, key.name))
    except KubeNotFound:
        if missing_ok:
            return False
        raise
    log.info("service_export_deleted namespace=%s name=%s", key.namespace, key.name)
    return True


def service_exists_sync(api: k8s_client.ApiClient, key: ServiceKey) -> bool:
    """Whether the API server holds the Service ``key``."""
    core = k8s_client.CoreV1Api(api)
    try:
        api_request(f"get Service {key.namespace}/{key.name}",
                    lambda: core.read_namespaced_service(key.name, key.namespace))
    except KubeNotFound:
        return False
    return True


def get_service_export_sync(api: k8s_client.ApiClient, key: ServiceKey) -> Mapping[str, Any] | None:
    """The ServiceExport object for ``key`` as the API server holds it, or None."""
    custom = k8s_client.CustomObjectsApi(api)
    request = f"get ServiceExport {key.namespace}/{key.name}"
    version = served_mcs_version_sync(api)
    try:
        obj = api_request(request, lambda: custom.get_namespaced_custom_object(MCS_GROUP, version, key.namespace,
                                                                            SERVICE_EXPORTS, key.name))
    except KubeNotFound:
        return None
    return obj if isinstance(obj, Mapping) else None


async def create_service_export(api: k8s_client.ApiClient, key: ServiceKey, *, exist_ok: bool = False) -> bool:
    """Async form of :func:`create_service_export_sync` (runs in a thread)."""
    return await asyncio.to_thread(create_service_export_sync, api, key, exist_ok=exist_ok)


async def delete_service_export(api: k8s_client.ApiClient, key: ServiceKey, *, missing_ok: bool = False) -> bool:
    """Async form of :func:`delete_service_export_sync` (runs in a thread)."""
    return await asyncio.to_thread(delete_service_export_sync, api, key, missing_ok=missing_ok)


def read_cluster_properties_sync(api: k8s_client.ApiClient) -> dict[str, str]:
    """The cluster's KEP-2149 identity properties (``cluster.clusterset.k8s.io``, ``clusterset.k8s.io``) that
    exist, name -> ``spec.value``; empty when the cluster does not serve ``ClusterProperty`` at all."""
    custom = k8s_client.CustomObjectsApi(api)
    out: dict[str, str] = {}
    for name in (clusterid.CLUSTER_ID_PROPERTY, clusterid.CLUSTERSET_PROPERTY):
        try:
            obj = api_request(f"get ClusterProperty {name}", functools.partial(
                custom.get_cluster_custom_object, clusterid.GROUP, clusterid.VERSION, clusterid.PLURAL, name))
        except KubeNotFound:
            continue  # no such property, or the CRD is not installed
        value = (obj.get("spec") or {}).get("value") if isinstance(obj, Mapping) else None
        if isinstance(value, str):
            out[name] = value
    return out


# ------------------------------------------------------------------------------------------------------ webhook


def sync_webhook_ca_bundle_sync(api: k8s_client.ApiClient, name: str, pem: str) -> bool:
    """Make every webhook of the MutatingWebhookConfiguration ``name`` trust exactly ``pem`` (the clusterset's
    roots: during a root rotation the old and the new, before the webhook's serving certificate moves to the new
    one), as istiod keeps its injector's ``caBundle``. Returns whether it wrote. Optimistic: the replace carries the
    object's resourceVersion, so a concurrent edit makes it fail (409) rather than be lost; the caller retries.
    ``KubeNotFound`` when there is no such configuration."""
    admission = k8s_client.AdmissionregistrationV1Api(api)
    what = f"MutatingWebhookConfiguration {name}"
    resp: Any = api_request(f"get {what}", lambda: admission.read_mutating_webhook_configuration(
        name, _preload_content=False))
    try:
        obj = json.loads(resp.data)
    finally:
        resp.release_conn()
    want = base64.b64encode(pem.encode()).decode("ascii")
    changed = False
    for hook in obj.get("webhooks") or ():
        config = hook.setdefault("clientConfig", {})
        if config.get("caBundle") != want:
            config["caBundle"] = want
            changed = True
    if changed:
        api_request(f"replace {what}", lambda: admission.replace_mutating_webhook_configuration(name, obj))
        log.info("webhook_ca_bundle_written configuration=%s webhooks=%d", name, len(obj.get("webhooks") or ()))
    return changed
