"""The Kubernetes source's Istio policy kinds (VirtualService, DestinationRule, AuthorizationPolicy) against the API
server test double, through the real ``kubernetes`` client: they land in ``ClusterSnapshot.extras``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from discovery import convert
from discovery.authz import Action, AuthorizationPolicy
from discovery.kube import KubeSource
from discovery.kube.reflector import _Converted, _Delete, _Replace, _Upsert
from discovery.manifests import parse_file
from discovery.model import cluster_id
from discovery.policy import DestinationRule, TrafficPolicies, VirtualService
from discovery.source import LoadResult
from tests.discovery.test_kube import WAIT, endpoint_slice, key, service, until
from tests.support.kubeapi import KubeApiDouble

NET = "networking.istio.io/v1"
SEC = "security.istio.io/v1"
HOST = "reviews.default.svc.clusterset.local"


def authz(name: str, ns: str = "default", action: str = "ALLOW", *, app: str = "reviews",
          sa: str = "sleep", api_version: str = SEC) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "AuthorizationPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": app}}, "action": action,
                     "rules": [{"from": [{"source": {"principals": [f"demo.meshfed.local/ns/default/sa/{sa}"]}}]}]}}


def destination_rule(name: str = "reviews", ns: str = "default", *, subsets: tuple[str, ...] = ("east", "west"),
                     api_version: str = NET) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "DestinationRule", "metadata": {"name": name, "namespace": ns},
            "spec": {"host": HOST, "subsets": [{"name": s, "labels": {"topology.istio.io/cluster": s}}
                                               for s in subsets]}}


def virtual_service(name: str = "reviews", ns: str = "default", *, east: int = 90,
                    api_version: str = NET) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "VirtualService", "metadata": {"name": name, "namespace": ns},
            "spec": {"hosts": [HOST], "http": [{"route": [
                {"destination": {"host": HOST, "subset": "east"}, "weight": east},
                {"destination": {"host": HOST, "subset": "west"}, "weight": 100 - east}]}]}}


def policies(result: LoadResult) -> list[tuple[str, str, str]]:
    return [(type(o).__name__, o.namespace, o.name) for o in result.snapshot.extras]


def weights(result: LoadResult) -> list[int]:
    vs = TrafficPolicies.of(result.snapshot.extras).virtual_service(key("reviews"))
    return [w.weight for w in vs.http[0].route] if vs is not None else []


async def test_policies_appear_change_and_disappear(api: KubeApiDouble, source: KubeSource) -> None:
    api.put_object(service("reviews"))
    api.put_object(authz("zeta", ns="shop"))
    results = source.watch()
    first = await until(results, lambda r: len(r.snapshot.extras) == 1 and key("reviews") in r.snapshot.services)
    assert first.problems == ()
    [policy] = first.snapshot.extras
    assert isinstance(policy, AuthorizationPolicy) and policy.cluster == "east" and policy.action == Action.ALLOW

    # Added through the watches, in (kind, namespace, name) order whatever order they were written in.
    api.put_object(virtual_service())
    api.put_object(destination_rule())
    api.put_object(authz("alpha", action="DENY"))
    got = await until(results, lambda r: len(r.snapshot.extras) == 4)
    assert policies(got) == [("AuthorizationPolicy", "default", "alpha"), ("AuthorizationPolicy", "shop", "zeta"),
                             ("DestinationRule", "default", "reviews"), ("VirtualService", "default", "reviews")]
    traffic = TrafficPolicies.of(got.snapshot.extras)
    assert traffic.problems == ()
    assert isinstance(traffic.destination_rule(key("reviews")), DestinationRule)
    assert weights(got) == [90, 10]
    version = got.snapshot.version

    # Modified: the new version replaces the old one; services are untouched.
    api.put_object(virtual_service(east=50))
    got = await until(results, lambda r: weights(r) == [50, 50])
    assert got.snapshot.version != version and len(got.snapshot.extras) == 4
    assert key("reviews") in got.snapshot.services

    # Deleted: it leaves the snapshot.
    api.delete_object(SEC, "AuthorizationPolicy", "zeta", "shop")
    api.delete_object(NET, "VirtualService", "reviews")
    got = await until(results, lambda r: len(r.snapshot.extras) == 2)
    assert policies(got) == [("AuthorizationPolicy", "default", "alpha"), ("DestinationRule", "default", "reviews")]
    assert all(r.stats.lists == 1 for r in source.reflectors.values())  # all through the watches


async def test_same_extras_as_the_manifest_source(api: KubeApiDouble, kubeconfig: Path) -> None:
    """The same objects as manifests and through the API give equal policy values (the same converters)."""
    objects = [authz("b"), authz("a", ns="shop", action="DENY"), destination_rule(), virtual_service()]
    for obj in objects:
        api.put_object(obj)
    import yaml

    text = yaml.safe_dump_all(objects)
    converted, problems = parse_file(text, file="x.yaml", cluster=cluster_id("east"))
    assert problems == []
    src = await KubeSource.from_kubeconfig(cluster="east", kubeconfig=kubeconfig, context="east")
    async with src:
        async with asyncio.timeout(WAIT):
            first = await anext(aiter(src.watch()))
    expected = sorted((v for _, v in converted), key=lambda v: (type(v).__name__, v.namespace, v.name))
    assert list(first.snapshot.extras) == expected


async def test_bad_policy_is_reported_and_the_last_good_one_kept(api: KubeApiDouble, source: KubeSource) -> None:
    api.put_object(authz("allow-sleep"))
    api.put_object(virtual_service())
    results = source.watch()
    await until(results, lambda r: len(r.snapshot.extras) == 2)
    bad = authz("allow-sleep")
    bad["spec"]["action"] = "AUDIT"
    api.put_object(bad)
    bad_vs = virtual_service(east=30)
    bad_vs["spec"]["http"][0]["route"][0]["weight"] = "lots"
    api.put_object(bad_vs)
    got = await until(results, lambda r: len(r.problems) == 2)
    by_message = sorted(got.problems, key=lambda p: p.message)
    assert "AuthorizationPolicy default/allow-sleep" in by_message[0].message
    assert by_message[0].field == "spec.action"
    assert "VirtualService default/reviews" in by_message[1].message
    assert by_message[1].field.startswith("spec.http[0].route[0]")
    # The last good versions stay in force.
    [policy] = [o for o in got.snapshot.extras if isinstance(o, AuthorizationPolicy)]
    assert policy.action == Action.ALLOW
    assert weights(got) == [90, 10]
    # A fixed object clears its problem.
    api.put_object(authz("allow-sleep", action="DENY"))
    got = await until(results, lambda r: len(r.problems) == 1)
    assert "VirtualService default/reviews" in got.problems[0].message
    [policy] = [o for o in got.snapshot.extras if isinstance(o, AuthorizationPolicy)]
    assert policy.action == Action.DENY
    # A policy that never converted is reported and absent.
    api.put_object({**authz("never"), "spec": {"action": "SOMETIMES"}})
    got = await until(results, lambda r: len(r.problems) == 2)
    assert ("AuthorizationPolicy", "default", "never") not in policies(got)


def _crd(group: str, plural: str, kind: str, versions: tuple[str, ...] = ("v1",)) -> dict[str, Any]:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"plural": plural, "kind": kind, "singular": kind.lower(), "listKind": kind + "List"},
                     "versions": [{"name": v, "served": True, "storage": i == 0,
                                   "schema": {"openAPIV3Schema": {"type": "object",
                                                                  "x-kubernetes-preserve-unknown-fields": True}}}
                                  for i, v in enumerate(versions)]}}


async def test_missing_policy_crds_are_fine_until_they_appear(tmp_path: Path) -> None:
    # A strict double serves custom resources only while their CRD exists, as a real cluster without Istio.
    with KubeApiDouble(strict=True) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", context="east")
        api.put_object(_crd("multicluster.x-k8s.io", "serviceexports", "ServiceExport", ("v1alpha1",)))
        api.put_object(service("reviews"))
        api.put_object(endpoint_slice("reviews", "10.1.0.1"))
        src = await KubeSource.from_kubeconfig(cluster="east", kubeconfig=kubeconfig, context="east",
                                               backoff_base=0.05, backoff_cap=0.3)
        async with src:
            results = src.watch()
            first = await until(results, lambda r: key("reviews") in r.snapshot.services)
            assert first.snapshot.extras == () and first.problems == ()
            # Every version was tried before the kind was called missing.
            paths = [p for _, p in list(api.requests)]
            assert any("/apis/security.istio.io/v1/authorizationpolicies" in p for p in paths)
            assert any("/apis/security.istio.io/v1beta1/authorizationpolicies" in p for p in paths)
            # The CRDs are installed later (AuthorizationPolicy served only at v1beta1, an older Istio): the
            # policies arrive without a restart.
            api.put_object(_crd("security.istio.io", "authorizationpolicies", "AuthorizationPolicy", ("v1beta1",)))
            api.put_object(_crd("networking.istio.io", "virtualservices", "VirtualService", ("v1", "v1beta1")))
            api.put_object(authz("allow-sleep", api_version="security.istio.io/v1beta1"))
            api.put_object(virtual_service())
            got = await until(results, lambda r: len(r.snapshot.extras) == 2)
            assert policies(got) == [("AuthorizationPolicy", "default", "allow-sleep"),
                                     ("VirtualService", "default", "reviews")]
            assert src.reflectors["AuthorizationPolicy"].version == "v1beta1"
            assert src.reflectors["VirtualService"].version == "v1"
            assert key("reviews") in got.snapshot.services and got.problems == ()
            # Removing a CRD removes its objects (the API server deletes them): they leave the snapshot.
            api.delete_object("apiextensions.k8s.io/v1", "CustomResourceDefinition",
                              "virtualservices.networking.istio.io", "")
            got = await until(results, lambda r: len(r.snapshot.extras) == 1)
            assert policies(got) == [("AuthorizationPolicy", "default", "allow-sleep")]
            assert src.reflectors["DestinationRule"].stats.lists == 0  # never served: never listed


async def test_forbidden_policies_do_not_hold_back_services(api: KubeApiDouble, kubeconfig: Path) -> None:
    api.put_object(service("reviews"))
    api.put_object(authz("allow-sleep"))
    # As with a ClusterRole from before policies were watched: reading them is forbidden for a while.
    api.inject_error(3, code=403, path_prefix="/apis/security.istio.io/")
    src = await KubeSource.from_kubeconfig(cluster="east", kubeconfig=kubeconfig, context="east",
                                           backoff_base=0.05, backoff_cap=0.2)
    async with src:
        results = src.watch()
        first = await until(results, lambda r: key("reviews") in r.snapshot.services)
        assert first.snapshot.extras == ()
        got = await until(results, lambda r: len(r.snapshot.extras) == 1)
        assert key("reviews") in got.snapshot.services
        assert src.reflectors["AuthorizationPolicy"].stats.errors == 3


async def test_incremental_extras_equal_a_full_sort() -> None:
    """Random policy and service changes fed straight into the source (no threads): the extras always equal the
    live policies sorted by (kind, namespace, name), and service-only changes leave the extras tuple alone."""
    import random

    rng = random.Random(2026)
    src = KubeSource(api=None, cluster="east")  # type: ignore[arg-type]
    cluster = src.cluster
    src._loop = asyncio.get_running_loop()
    for kind in ("Service", "EndpointSlice", "ServiceExport", "AuthorizationPolicy", "DestinationRule",
                 "VirtualService"):
        src._apply(_Replace(kind, {}, "1"))
    live: dict[tuple[str, str, str], Any] = {}
    rv = 1
    makers = {"AuthorizationPolicy": lambda n, ns: authz(n, ns, rng.choice(["ALLOW", "DENY"])),
              "DestinationRule": lambda n, ns: destination_rule(n, ns),
              "VirtualService": lambda n, ns: virtual_service(n, ns, east=rng.randint(0, 100)),
              "Service": lambda n, ns: service(n, ns)}
    for step in range(300):
        rv += 1
        kind = rng.choice(list(makers))
        name, ns = rng.choice(["a", "b", "c"]), rng.choice(["default", "shop"])
        obj = makers[kind](name, ns)
        obj["metadata"]["resourceVersion"] = str(rv)
        if rng.random() < 0.3 and (kind, ns, name) in live:
            live.pop((kind, ns, name))
            src._apply(_Delete(kind, ns, name, str(rv)))
        else:
            value = convert.convert(obj, cluster=cluster)
            live[(kind, ns, name)] = value
            src._apply(_Upsert(kind, ns, name, _Converted(value, str(rv)), str(rv)))
        before = src._extras
        result = await src._snapshot(src._gen)
        expected = tuple(v for (k, _, _), v in sorted(live.items()) if k != "Service")
        assert result.snapshot.extras == expected, step
        if kind == "Service":
            assert result.snapshot.extras is before  # not rebuilt for a service change
        assert not isinstance(result.snapshot.extras, list)
        assert all(isinstance(o, AuthorizationPolicy | DestinationRule | VirtualService)
                   for o in result.snapshot.extras)
