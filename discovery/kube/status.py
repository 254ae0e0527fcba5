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

from discovery.convert import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MCS_GROUP,
    MCS_SERVICE_NAME_LABEL,
    SLICE_MANAGED_BY,
    SLICE_MANAGED_BY_LABEL,
    ImportedSlice,
    condition_object,
    imported_slice_object,
    service_import_object,
)
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


def _apply_sync(api: k8s_client.ApiClient, plural: str, body: Mapping[str, Any], *, status: bool) -> Any:
    """Server-side apply ``body`` (field manager meshfed, forced) to the object, or to its status subresource;
    returns the object the server answers with."""
    meta = body["metadata"]
    version = str(body["apiVersion"]).rsplit("/", 1)[1]
    custom = k8s_client.CustomObjectsApi(api)
    call = custom.patch_namespaced_custom_object_status if status else custom.patch_namespaced_custom_object
    return api_request(f"apply {body['kind']} {meta['namespace']}/{meta['name']}{' status' if status else ''}",
                       lambda: call(MCS_GROUP, version, meta["namespace"], plural, meta["name"], dict(body),
                                    field_manager=FIELD_MANAGER, force=True,
                                    _content_type="application/apply-patch+yaml"))


class _Writer:
    """What the ServiceImport and EndpointSlice writers share: counters, and deleting one object."""

    writes: int
    deletes: int
    failures: int

    async def _write(self, what: str, key: ServiceKey, missing: str, write: Callable[[], None]) -> bool:
        """Run the blocking ``write`` (:func:`_attempt`), counting it: True when it was written."""
        outcome = await _attempt(what, key, missing, write)
        if outcome is not True:
            self.failures += outcome is False
            return False
        self.writes += 1
        return True

    async def _delete(self, key: ServiceKey, delete: Callable[[], None], what: str = "service_import") -> bool | None:
        """Run the blocking ``delete``: True when it deleted the object, None when it was gone already, False on
        another failure (logged, counted; retried with the next change)."""
        try:
            await asyncio.to_thread(delete)
            self.deletes += 1
        except KubeNotFound:
            return None
        except KubeError as exc:
            self.failures += 1
            log.warning("%s_delete_failed namespace=%s name=%s error=%s", what, key.namespace, key.name,
                        describe_error(exc))
            return False
        return True


class ExportStatusWriter(_Writer):
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
        self.deletes = 0
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
            if not await self._write("export_status", key, "not-found",
                                     functools.partial(apply_export_status_sync, self._api, body)):
                continue
            self._written[key] = state
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


class ImportWriter(_Writer):
    """Writes the clusterset's ServiceImports into one cluster, each only when it changed, and deletes the ones
    it wrote whose service is no longer imported. A namespace the cluster does not have is skipped (the KEP
    creates a ServiceImport only where the namespace exists) and tried again with the next change."""

    def __init__(self, *, api: k8s_client.ApiClient, version: Callable[[], str]) -> None:
        self._api = api
        self._version = version
        self._written: dict[ServiceKey, tuple[str, ServiceImport]] = {}
        self._uids: dict[ServiceKey, tuple[str, str]] = {}
        self._listed = False
        self.writes = 0
        self.deletes = 0
        self.failures = 0

    def owner(self, key: ServiceKey) -> tuple[str, str] | None:
        """(apiVersion, uid) of the ServiceImport last written for ``key``, for owner references; None while it
        is not written (its namespace missing, a failed write) or deleted."""
        return self._uids.get(key)

    def _apply_import(self, body: Mapping[str, Any]) -> None:
        """The object (spec, labels), then its status subresource (``status.clusters``)."""
        written = _apply_sync(self._api, SERVICE_IMPORTS, {k: v for k, v in body.items() if k != "status"},
                              status=False)
        meta = {"name": body["metadata"]["name"], "namespace": body["metadata"]["namespace"]}
        if not isinstance(written, Mapping):
            # The client returns nothing for 201 Created (its response map has 200 only): read the object.
            version = str(body["apiVersion"]).rsplit("/", 1)[1]
            written = api_request(f"get ServiceImport {meta['namespace']}/{meta['name']}",
                                  lambda: k8s_client.CustomObjectsApi(self._api).get_namespaced_custom_object(
                                      MCS_GROUP, version, meta["namespace"], SERVICE_IMPORTS, meta["name"]))
        uid = (written.get("metadata") or {}).get("uid") if isinstance(written, Mapping) else None
        key = ServiceKey.parse(f"{meta['name']}.{meta['namespace']}")
        if uid:
            self._uids[key] = (str(body["apiVersion"]), str(uid))
        else:
            self._uids.pop(key, None)
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
            outcome = await self._delete(key, functools.partial(_delete_sync, self._api, key, version))
            if outcome is False:
                continue
            done += outcome is True
            self._written.pop(key, None)
            self._uids.pop(key, None)
        for key, imp in sorted(imports.items()):
            if self._written.get(key) == (version, imp):
                continue
            body = service_import_object(imp, version=version)
            if not await self._write("service_import", key, "no-namespace",
                                     functools.partial(self._apply_import, body)):
                continue
            self._written[key] = (version, imp)
            done += 1
        return done


def _list_slices_sync(api: k8s_client.ApiClient) -> set[tuple[ServiceKey, str]]:
    listing = api_request("list EndpointSlices", lambda: k8s_client.DiscoveryV1Api(api)
                          .list_endpoint_slice_for_all_namespaces(
                              label_selector=f"{SLICE_MANAGED_BY_LABEL}={SLICE_MANAGED_BY}"))
    out: set[tuple[ServiceKey, str]] = set()
    for item in listing.items or []:
        meta = item.metadata
        if meta is None:
            continue
        try:
            key = ServiceKey.parse(f"{(meta.labels or {}).get(MCS_SERVICE_NAME_LABEL)}.{meta.namespace}")
        except ValueError:
            continue
        out.add((key, str(meta.name)))
    return out


def _apply_slice_sync(api: k8s_client.ApiClient, body: Mapping[str, Any]) -> None:
    meta = body["metadata"]
    api_request(f"apply EndpointSlice {meta['namespace']}/{meta['name']}",
                lambda: k8s_client.DiscoveryV1Api(api).patch_namespaced_endpoint_slice(
                    meta["name"], meta["namespace"], dict(body), field_manager=FIELD_MANAGER, force=True,
                    _content_type="application/apply-patch+yaml"))


def _delete_slice_sync(api: k8s_client.ApiClient, namespace: str, name: str) -> None:
    api_request(f"delete EndpointSlice {namespace}/{name}",
                lambda: k8s_client.DiscoveryV1Api(api).delete_namespaced_endpoint_slice(name, namespace))


class SliceWriter(_Writer):
    """Writes the multicluster EndpointSlices of the clusterset's imports into one cluster (one per source
    cluster and address family, :func:`discovery.convert.imported_slices`), each owned by its ServiceImport, so
    only after ``imports`` (the :class:`ImportWriter` of the same cluster) has written that; each only when it
    changed, and deletes the ones it wrote that are no longer wanted (also leftovers from before a restart, found
    by one list of the slices labelled managed by meshfed)."""

    def __init__(self, *, api: k8s_client.ApiClient, imports: ImportWriter) -> None:
        self._api = api
        self._imports = imports
        self._written: dict[tuple[ServiceKey, str], tuple[tuple[str, str], ImportedSlice]] = {}
        self._listed = False
        self.writes = 0
        self.deletes = 0
        self.failures = 0

    async def sync(self, slices: Mapping[tuple[ServiceKey, str], ImportedSlice]) -> int:
        """Apply every changed slice whose ServiceImport is written and delete the unwanted ones; returns how
        many objects it wrote or deleted."""
        done = 0
        stale = {k for k in self._written if k not in slices}
        if not self._listed:
            try:
                stale |= {k for k in await asyncio.to_thread(_list_slices_sync, self._api) if k not in slices}
                self._listed = True
            except KubeError as exc:
                self.failures += 1
                log.warning("endpoint_slices_list_failed error=%s (retried on the next change)", describe_error(exc))
        for key, name in sorted(stale):
            outcome = await self._delete(key, functools.partial(_delete_slice_sync, self._api, key.namespace, name),
                                         "endpoint_slice")
            if outcome is False:
                continue
            done += outcome is True
            self._written.pop((key, name), None)
        for ident, sl in sorted(slices.items()):
            owner = self._imports.owner(sl.key)
            if owner is None:
                continue  # its ServiceImport is not written (yet): nothing to own the slice
            state = (owner, sl)
            if self._written.get(ident) == state:
                continue
            body = imported_slice_object(sl, owner=owner)
            if not await self._write("endpoint_slice", sl.key, "no-namespace",
                                     functools.partial(_apply_slice_sync, self._api, body)):
                continue
            self._written[ident] = state
            done += 1
        return done
