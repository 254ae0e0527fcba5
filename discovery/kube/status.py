"""Status written back: each control plane writes its own ServiceExports' MCS conditions (Valid, Ready, Conflict)
to their ``status`` subresource, by server-side apply with field manager ``meshfed``, so ``kubectl get
serviceexport -o yaml`` and the conformance suite's condition checks see what the control plane concluded.

:class:`ExportStatusWriter` remembers what it last applied per export and writes only what changed; an export
deleted meanwhile (404) is forgotten, any other failure is logged and retried at the next :meth:`sync`. The body
is a pure function (:func:`export_status_body`); the blocking client call runs in a thread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from kubernetes import client as k8s_client

from discovery.convert import MCS_GROUP, condition_object
from discovery.kube.client import SERVICE_EXPORTS
from discovery.kube.errors import KubeError, KubeNotFound, api_request, describe_error
from discovery.model import Condition, ServiceExport, ServiceKey

log = logging.getLogger("meshfed.discovery.kube")

FIELD_MANAGER = "meshfed"


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
    meta = body["metadata"]
    version = str(body["apiVersion"]).rsplit("/", 1)[1]
    custom = k8s_client.CustomObjectsApi(api)
    api_request(f"apply ServiceExport {meta['namespace']}/{meta['name']} status",
                lambda: custom.patch_namespaced_custom_object_status(
                    MCS_GROUP, version, meta["namespace"], SERVICE_EXPORTS, meta["name"], dict(body),
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
            try:
                await asyncio.to_thread(apply_export_status_sync, self._api, body)
            except KubeNotFound:
                log.info("export_status_skipped namespace=%s name=%s reason=not-found", key.namespace, key.name)
                continue
            except KubeError as exc:
                self.failures += 1
                log.warning("export_status_failed namespace=%s name=%s error=%s (retried on the next change)",
                            key.namespace, key.name, describe_error(exc))
                continue
            self._written[key] = state
            self.writes += 1
            wrote += 1
        return wrote

