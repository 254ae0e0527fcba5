"""Status written back: each control plane writes its own ServiceExports' MCS conditions (Valid, Ready, Conflict)
to their ``status`` subresource, and the clusterset's derived ServiceImports into its cluster (spec, then
``status.clusters``), by server-side apply with field manager ``meshfed``, so ``kubectl get serviceexport -o
yaml`` and the conformance suite's checks see what the control plane concluded. ServiceImports it wrote (label
``app.kubernetes.io/managed-by: meshfed``) whose service is no longer exported anywhere are deleted, also ones
left from before a restart (:class:`ImportWriter` lists them once).

:class:`ExportStatusWriter` remembers what it last applied per export and writes only what changed; an export
deleted meanwhile (404) is forgotten, any other failure is logged and retried at the next :meth:`sync`. The body
is a pure function (:func:`export_status_body`); the blocking client call runs in a thread."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from kubernetes import client as k8s_client

from discovery.convert import MANAGED_BY, MANAGED_BY_LABEL, MCS_GROUP, condition_object, service_import_object
from discovery.kube.client import SERVICE_EXPORTS
from discovery.kube.errors import KubeError, KubeNotFound, api_request, describe_error
from discovery.model import Condition, ServiceExport, ServiceImport, ServiceKey

log = logging.getLogger("meshfed.discovery.kube")

FIELD_MANAGER = "meshfed"
SERVICE_IMPORTS = "serviceimports"


def export_status_body(export: ServiceExport, *, version: str, now: datetime) -> dict[str, Any]:
    """The apply configuration of ``export``'s status at MCS API ``version``: its conditions as
    ``metav1.Condition`` objects (one not yet stamped gets ``now`` as its transition time, which the CRD
    requires)."""
    conditions = [condition_object(c if c.last_transition_time is not None else replace(c, last_transition_time=now))
                  for c in export.conditions]
    return {"apiVersion": f"{MCS_GROUP}/{version}", "kind": "ServiceExport",
            "metadata": {"name": export.key.name, "namespace": export.key.namespace},
            "status": {"conditions": conditions}}


def apply_export_status_sync(api: k8s_client.ApiClient, body: Mapping[str, Any]) -> None:
    """Server-side apply ``body`` (from :func:`export_status_body`) to the ServiceExport's status subresource."""
    _apply_sync(api, SERVICE_EXPORTS, body, status=True)


def _apply_sync(api: k8s_client.ApiClient, plural: str, body: Mapping[str, Any], *, status: bool) -> None:
    """Server-side apply ``body`` (field manager meshfed, forced) to the object, or to its status subresource."""
    meta = body["metadata"]
    version = str(body["apiVersion"]).rsplit("/", 1)[1]
    custom = k8s_client.CustomObjectsApi(api)
    call = custom.patch_namespaced_custom_object_status if status else custom.patch_namespaced_custom_object
    api_request(f"apply {body['kind']} {meta['namespace']}/{meta['name']}{' status' if status else ''}",
                lambda: call(MCS_GROUP, version, meta["namespace"], plural, meta["name"], dict(body),
                             field_manager=FIELD_MANAGER, force=True, _content_type="application/apply-patch+yaml"))


class ExportStatusWriter:
    """Writes the conditions of one cluster's ServiceExports to the API, each only when it changed.

    ``version`` says which MCS API version to write at (the one the source reads: v1beta1 where served);
    ``clock`` gives ``now`` for conditions not stamped yet."""

    def __init__(self, *, api: k8s_client.ApiClient, version: Callable[[], str],
                 clock: Callable[[], datetime]) -> None:
        self._api = api
        self._version = version
        self._clock = clock
        self._written: dict[ServiceKey, tuple[str, tuple[Condition, ...]]] = {}
        self.writes = 0
        self.failures = 0

    async def sync(self, exports: Mapping[ServiceKey, ServiceExport]) -> int:
        """Apply the status of every export in ``exports`` whose conditions differ from what was last applied
        (exports without conditions yet are left alone); forget the ones that are gone. Returns how many it
        wrote."""
        for key in [k for k in self._written if k not in exports]:
            del self._written[key]
        version = self._version()
        now = self._clock()
        wrote = 0
        for key, export in sorted(exports.items()):
            if not export.conditions:
                continue
            state = (version, export.conditions)
            if self._written.get(key) == state:
                continue
            body = export_status_body(export, version=version, now=now)
            outcome = await _attempt("export_status", key, "not-found",
                                     functools.partial(apply_export_status_sync, self._api, body))
            if outcome is not True:
                self.failures += outcome is False
                continue
            self._written[key] = state
            self.writes += 1
            wrote += 1
        return wrote




def _list_managed_sync(api: k8s_client.ApiClient, version: str) -> set[ServiceKey]:
    custom = k8s_client.CustomObjectsApi(api)
    listing = api_request("list ServiceImports", lambda: custom.list_cluster_custom_object(
        MCS_GROUP, version, SERVICE_IMPORTS, label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}"))
    out: set[ServiceKey] = set()
    for item in listing.get("items", []) if isinstance(listing, Mapping) else []:
        meta = item.get("metadata") or {}
        try:
            out.add(ServiceKey.parse(f"{meta.get('name')}.{meta.get('namespace')}"))
        except ValueError:
            continue
    return out


def _delete_sync(api: k8s_client.ApiClient, key: ServiceKey, version: str) -> None:
    custom = k8s_client.CustomObjectsApi(api)
    api_request(f"delete ServiceImport {key.namespace}/{key.name}", lambda: custom.delete_namespaced_custom_object(
        MCS_GROUP, version, key.namespace, SERVICE_IMPORTS, key.name))


async def _attempt(what: str, key: ServiceKey, missing: str, write: Callable[[], None]) -> bool | None:
    """Run the blocking ``write`` in a thread: True when it succeeded, None when the object or its namespace is
    not there (404, logged as ``missing``), False on any other failure (logged; the caller retries later)."""
    try:
        await asyncio.to_thread(write)
    except KubeNotFound:
        log.info("%s_skipped namespace=%s name=%s reason=%s", what, key.namespace, key.name, missing)
        return None
    except KubeError as exc:
        log.warning("%s_failed namespace=%s name=%s error=%s (retried on the next change)", what, key.namespace,
                    key.name, describe_error(exc))
        return False
    return True


class ImportWriter:
    """Writes the clusterset's ServiceImports into one cluster, each only when it changed, and deletes the ones
    it wrote whose service is no longer imported. A namespace the cluster does not have is skipped (the KEP
    creates a ServiceImport only where the namespace exists) and tried again with the next change."""

    def __init__(self, *, api: k8s_client.ApiClient, version: Callable[[], str]) -> None:
        self._api = api
        self._version = version
        self._written: dict[ServiceKey, tuple[str, ServiceImport]] = {}
        self._listed = False
        self.writes = 0
        self.deletes = 0
        self.failures = 0

    def _apply_import(self, body: Mapping[str, Any]) -> None:
        """The object (spec, labels), then its status subresource (``status.clusters``)."""
        _apply_sync(self._api, SERVICE_IMPORTS, {k: v for k, v in body.items() if k != "status"}, status=False)
        meta = {"name": body["metadata"]["name"], "namespace": body["metadata"]["namespace"]}
        _apply_sync(self._api, SERVICE_IMPORTS, {"apiVersion": body["apiVersion"], "kind": body["kind"],
                                                 "metadata": meta, "status": body["status"]}, status=True)

    async def sync(self, imports: Mapping[ServiceKey, ServiceImport]) -> int:
        """Apply every changed import and delete the gone ones; returns how many objects it wrote or deleted."""
        version = self._version()
        done = 0
        stale: set[ServiceKey] = {k for k in self._written if k not in imports}
        if not self._listed:
            try:
                stale |= {k for k in await asyncio.to_thread(_list_managed_sync, self._api, version)
                          if k not in imports}
                self._listed = True
            except KubeError as exc:
                self.failures += 1
                log.warning("service_imports_list_failed error=%s (retried on the next change)", describe_error(exc))
        for key in sorted(stale):
            try:
                await asyncio.to_thread(_delete_sync, self._api, key, version)
                self.deletes += 1
                done += 1
            except KubeNotFound:
                pass
            except KubeError as exc:
                self.failures += 1
                log.warning("service_import_delete_failed namespace=%s name=%s error=%s", key.namespace, key.name,
                            describe_error(exc))
                continue
            self._written.pop(key, None)
        for key, imp in sorted(imports.items()):
            if self._written.get(key) == (version, imp):
                continue
            body = service_import_object(imp, version=version)
            outcome = await _attempt("service_import", key, "no-namespace",
                                     functools.partial(self._apply_import, body))
            if outcome is not True:
                self.failures += outcome is False
                continue
            self._written[key] = (version, imp)
            self.writes += 1
            done += 1
        return done
