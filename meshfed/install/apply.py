"""Applying a render directory to clusters (an IO edge): the official ``kubernetes`` client's dynamic client,
create-or-replace, and bounded readiness waits.

Semantics, per object:

* absent: **create** it;
* present, carrying our ``meshfed.io/applied-hash`` annotation equal to the desired object's hash, and still
  holding every field we set (server defaults aside): **unchanged** (nothing is sent), which is what makes a
  re-run a no-op;
* otherwise **replace** it (PUT with the live ``resourceVersion``; a Service keeps its allocated cluster IPs and
  node ports); a PersistentVolumeClaim is never replaced (its spec is immutable): it is **kept**.

Phase by phase (:data:`meshfed.install.render.PHASES`): every cluster's objects of a phase are applied, then
every Deployment and StatefulSet of the phase is waited for (``status.readyReplicas`` reaching ``spec.replicas``
for the current generation) before the next phase starts. The first failure raises :class:`ApplyError` naming
the cluster, the object and the API server's answer; nothing after it is attempted.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from meshfed.install import ApplyError
from meshfed.install.output import Plan
from meshfed.install.render import content_hash, object_ref

log = logging.getLogger("meshfed.install")

HASH_ANNOTATION = "meshfed.io/applied-hash"
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet"})


@dataclass(frozen=True, slots=True)
class Outcome:
    cluster: str
    ref: str
    action: str  # created | replaced | unchanged | kept


class Reporter(Protocol):
    """Where the engine reports progress (the CLI draws it with rich; tests collect it)."""

    def applied(self, outcome: Outcome) -> None: ...

    def phase(self, name: str) -> None: ...

    def waiting(self, cluster: str, ref: str, detail: str, elapsed: float) -> None: ...

    def ready(self, cluster: str, ref: str) -> None: ...


class QuietReporter:
    def applied(self, outcome: Outcome) -> None:
        log.info("event=applied cluster=%s object=%r action=%s", outcome.cluster, outcome.ref, outcome.action)

    def phase(self, name: str) -> None:
        log.info("event=phase name=%s", name)

    def waiting(self, cluster: str, ref: str, detail: str, elapsed: float) -> None:
        log.debug("event=waiting cluster=%s object=%r detail=%r elapsed=%.1f", cluster, ref, detail, elapsed)

    def ready(self, cluster: str, ref: str) -> None:
        log.info("event=ready cluster=%s object=%r", cluster, ref)


def with_hash(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` annotated with the hash of its own content (without the annotation)."""
    desired = copy.deepcopy(dict(obj))
    meta = desired.setdefault("metadata", {})
    annotations = dict(meta.get("annotations") or {})
    annotations.pop(HASH_ANNOTATION, None)
    meta.pop("annotations", None)
    if annotations:
        meta["annotations"] = annotations
    digest = content_hash(desired)
    meta.setdefault("annotations", {})[HASH_ANNOTATION] = digest
    return desired


def _contains(want: Any, have: Any) -> bool:
    """Whether ``have`` holds everything ``want`` says (extra keys in ``have`` are server defaults)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and _contains(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(
            _contains(w, h) for w, h in zip(want, have, strict=True))
    return bool(want == have)


def drifted(desired: Mapping[str, Any], live: Mapping[str, Any]) -> bool:
    """Whether someone changed a live object that still carries our hash (e.g. ``kubectl edit``): every field we
    set must still be there with our value; fields the server added (defaults, status) do not count."""
    for key, value in desired.items():
        if key == "status":
            continue
        if key == "metadata":
            meta = live.get("metadata") or {}
            for part in ("labels", "annotations"):
                if not _contains(value.get(part) or {}, meta.get(part) or {}):
                    return True
            continue
        if key not in live or not _contains(value, live[key]):
            return True
    return False


def _api_reason(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    if status is not None:
        message, reason = "", getattr(exc, "reason", "") or ""
        if body:
            try:
                data = json.loads(body)
                message = str(data.get("message", ""))
                reason = str(data.get("reason", reason))
            except (ValueError, AttributeError):
                message = str(body)[:300]
        return f"{status} {reason}: {message}".rstrip(": ")
    return f"cannot reach the API server: {exc}"


def _keep_allocated(desired: dict[str, Any], live: Mapping[str, Any]) -> None:
    """Carry over what the API server allocated and would refuse to see changed or dropped."""
    if desired.get("kind") != "Service":
        return
    spec, live_spec = desired.setdefault("spec", {}), live.get("spec") or {}
    for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy", "healthCheckNodePort"):
        if key in live_spec and key not in spec:
            if key in ("clusterIP", "clusterIPs") and spec.get("clusterIP") == "None":
                continue
            spec[key] = live_spec[key]
    live_ports = {(p.get("name"), p.get("protocol", "TCP")): p for p in live_spec.get("ports") or []}
    if spec.get("type") in ("LoadBalancer", "NodePort"):
        for port in spec.get("ports") or []:
            node_port = live_ports.get((port.get("name"), port.get("protocol", "TCP")), {}).get("nodePort")
            if node_port and "nodePort" not in port:
                port["nodePort"] = node_port


def _check_fixed_cluster_ip(cluster: str, ref: str, desired: Mapping[str, Any], live: Mapping[str, Any]) -> None:
    """A Service whose render fixes ``spec.clusterIP`` (``--dns-service-ip``) against one that has another: the
    API server would refuse the change (the field is immutable) with a less helpful message."""
    if desired.get("kind") != "Service":
        return
    want = (desired.get("spec") or {}).get("clusterIP")
    have = (live.get("spec") or {}).get("clusterIP")
    if want and want != "None" and have and have != want:
        raise ApplyError(cluster, ref, "replacing", f"it has cluster IP {have}, the render asks for {want} "
                         f"(--dns-service-ip) and a Service's cluster IP cannot change: render with "
                         f"--dns-service-ip {cluster}={have}, or delete the Service and apply again")


class ClusterClient:
    """One cluster's API server through a ``kubernetes.client.ApiClient`` (from a kubeconfig context)."""

    def __init__(self, cluster: str, api_client: Any) -> None:
        self.cluster = cluster
        self._api_client = api_client
        self._dynamic: Any = None

    def _resource(self, obj: Mapping[str, Any], action: str) -> Any:
        from kubernetes import dynamic
        from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError

        ref = object_ref(obj)
        try:
            if self._dynamic is None:
                self._dynamic = dynamic.DynamicClient(self._api_client)  # type: ignore[no-untyped-call]
            try:
                return self._dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            except ResourceNotFoundError:
                self._dynamic.resources.invalidate_cache()
                return self._dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        except ResourceNotFoundError:
            raise ApplyError(self.cluster, ref, action, f"the API server does not serve {obj['apiVersion']} "
                             f"{obj['kind']} (is the CRD installed, or is the cluster too old?)") from None
        except DynamicApiError as exc:
            raise ApplyError(self.cluster, ref, action, _api_reason(exc)) from exc
        except Exception as exc:  # urllib3 / socket errors while discovering the API
            raise ApplyError(self.cluster, ref, action, _api_reason(exc)) from exc

    def _get(self, res: Any, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        from kubernetes.dynamic.exceptions import NotFoundError

        meta = obj["metadata"]
        kwargs = {"name": meta["name"]}
        if res.namespaced:
            kwargs["namespace"] = meta.get("namespace", "default")
        try:
            live = res.get(**kwargs)
        except NotFoundError:
            return None
        return dict(live.to_dict())

    def apply(self, obj: Mapping[str, Any]) -> Outcome:
        from kubernetes.dynamic.exceptions import ConflictError

        ref = object_ref(obj)
        desired = with_hash(obj)
        res = self._resource(obj, "looking up")
        ns = obj["metadata"].get("namespace") if res.namespaced else None
        action = "reading"
        try:
            for attempt in range(2):
                live = self._get(res, obj)
                if live is None:
                    action = "creating"
                    res.create(body=desired, namespace=ns)
                    return Outcome(self.cluster, ref, "created")
                have = ((live.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)
                if have == desired["metadata"]["annotations"][HASH_ANNOTATION] and not drifted(desired, live):
                    return Outcome(self.cluster, ref, "unchanged")
                if obj["kind"] == "PersistentVolumeClaim":
                    return Outcome(self.cluster, ref, "kept")
                _check_fixed_cluster_ip(self.cluster, ref, desired, live)
                body = copy.deepcopy(desired)
                body["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
                _keep_allocated(body, live)
                action = "replacing"
                try:
                    res.replace(body=body, namespace=ns)
                except ConflictError:
                    if attempt == 0:
                        continue  # someone wrote in between: read again and retry once
                    raise
                return Outcome(self.cluster, ref, "replaced")
        except ApplyError:
            raise
        except Exception as exc:
            raise ApplyError(self.cluster, ref, action, _api_reason(exc)) from exc
        raise ApplyError(self.cluster, ref, action, "conflicting writes; try again")

    def readiness(self, obj: Mapping[str, Any]) -> tuple[bool, str]:
        """(ready, detail) of a Deployment or StatefulSet."""
        ref = object_ref(obj)
        res = self._resource(obj, "waiting for")
        try:
            live = self._get(res, obj)
        except Exception as exc:
            raise ApplyError(self.cluster, ref, "waiting for", _api_reason(exc)) from exc
        if live is None:
            raise ApplyError(self.cluster, ref, "waiting for", "the object disappeared")
        return workload_ready(live)


def workload_ready(live: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a Deployment/StatefulSet's current generation has all its replicas ready, and a progress line."""
    spec = live.get("spec") or {}
    status = live.get("status") or {}
    want = int(spec.get("replicas", 1))
    ready = int(status.get("readyReplicas") or 0)
    generation = int((live.get("metadata") or {}).get("generation") or 0)
    observed = status.get("observedGeneration")
    updated = status.get("updatedReplicas")
    detail = f"{ready}/{want} ready"
    if observed is not None and int(observed) < generation:
        return False, f"{detail}, rollout of generation {generation} not observed yet"
    if updated is not None and int(updated) < want:
        return False, f"{detail}, {updated}/{want} updated"
    return ready >= want, detail


def apply_plan(
    plan: Plan,
    clients: Mapping[str, ClusterClient],
    *,
    reporter: Reporter | None = None,
    timeout: float = 300.0,
    poll: float = 1.0,
    wait: bool = True,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Outcome]:
    """Apply ``plan`` phase by phase; raise ApplyError on the first failure (or a wait running past ``timeout``
    seconds per phase)."""
    rep = reporter or QuietReporter()
    outcomes: list[Outcome] = []
    for phase, steps in plan.phases():
        rep.phase(phase)
        workloads: list[tuple[str, dict[str, Any]]] = []
        for step in steps:
            client = clients.get(step.cluster)
            if client is None:
                raise ApplyError(step.cluster, str(step.file), "applying", "no kubeconfig context for this cluster")
            for obj in step.objects:
                outcome = client.apply(obj)
                outcomes.append(outcome)
                rep.applied(outcome)
                if obj.get("kind") in WORKLOAD_KINDS:
                    workloads.append((step.cluster, obj))
        if not wait:
            continue
        start = clock()
        pending = list(workloads)
        while pending:
            waiting: list[tuple[str, dict[str, Any], str]] = []
            for cluster, obj in pending:
                ok, detail = clients[cluster].readiness(obj)
                if ok:
                    rep.ready(cluster, object_ref(obj))
                else:
                    waiting.append((cluster, obj, detail))
            if not waiting:
                break
            elapsed = clock() - start
            if elapsed >= timeout:
                cluster, obj, detail = waiting[0]
                raise ApplyError(cluster, object_ref(obj), "waiting for",
                                 f"not ready after {timeout:g}s ({detail}); see `kubectl --context ... -n "
                                 f"{obj['metadata'].get('namespace', '')} describe "
                                 f"{obj['kind'].lower()} {obj['metadata']['name']}`")
            for cluster, obj, detail in waiting:
                rep.waiting(cluster, object_ref(obj), detail, elapsed)
            pending = [(c, o) for c, o, _ in waiting]
            sleep(poll)
    return outcomes
