"""The Kubernetes source against the API server test double, through the real ``kubernetes`` client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from discovery.kube import (
    KINDS,
    Backoff,
    KubeAlreadyExists,
    KubeConfigError,
    KubeNotFound,
    KubeSource,
    create_service_export,
    delete_service_export,
    get_service_export_sync,
    load_api_client,
)
from discovery.model import ServiceKey, namespace, service_name
from discovery.source import LoadResult
from tests.support.kubeapi import KubeApiDouble

MCS = "multicluster.x-k8s.io/v1alpha1"
CORE = ("Service", "EndpointSlice", "ServiceExport")  # the per-service kinds (the policy kinds: test_kube_policies)
WAIT = 20.0  # upper bound for any one wait; never a timing assertion


def key(name: str, ns: str = "default") -> ServiceKey:
    return ServiceKey(namespace=namespace(ns), name=service_name(name))


def service(name: str, ns: str = "default", port: int = 80) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": "10.0.0.10", "ports": [{"name": "http", "port": port}]}}


def endpoint_slice(svc: str, *addresses: str, ns: str = "default", ready: bool = True,
                   name: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{svc}-abc", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a in addresses]}


def export(name: str, ns: str = "default") -> dict[str, Any]:
    return {"apiVersion": MCS, "kind": "ServiceExport", "metadata": {"name": name, "namespace": ns}}


async def until(results: AsyncIterator[LoadResult], pred: Callable[[LoadResult], bool]) -> LoadResult:
    """The first result satisfying ``pred`` (bounded by WAIT)."""
    last: LoadResult | None = None
    try:
        async with asyncio.timeout(WAIT):
            async for result in results:
                last = result
                if pred(result):
                    return result
    except TimeoutError:
        raise AssertionError(f"no snapshot matched within {WAIT}s; the last was {last}") from None
    raise AssertionError("the source stopped before the expected snapshot")


async def wait_until(pred: Callable[[], bool], what: str) -> None:
    # Polls state written by other threads (the double's, the reflectors'): no event to wait on.
    for _ in range(int(WAIT / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def addresses(result: LoadResult, name: str) -> list[tuple[str, bool]]:
    svc = result.snapshot.services.get(key(name))
    return [(e.address, e.ready) for e in svc.endpoints] if svc is not None else []


async def test_initial_list_gives_services_with_endpoints_and_exports(api: KubeApiDouble, source: KubeSource) -> None:
    # Objects written after the source started its lists still arrive through the watch.
    api.put_object(service("reviews"))
    api.put_object(endpoint_slice("reviews", "10.1.0.1", "10.1.0.2"))
    api.put_object(export("reviews"))
    api.put_object(service("ratings", ns="shop"))
    first = await until(source.watch(), lambda r: key("reviews") in r.snapshot.exports
                        and len(addresses(r, "reviews")) == 2
                        and key("ratings", "shop") in r.snapshot.services)
    assert first.snapshot.cluster == "east"
    assert addresses(first, "reviews") == [("10.1.0.1", True), ("10.1.0.2", True)]
    assert first.snapshot.services[key("reviews")].ports[0].port == 80
    assert first.snapshot.exports[key("reviews")].created.year >= 2024
    assert first.problems == ()


async def test_list_before_start(api: KubeApiDouble, kubeconfig: Path) -> None:
    api.put_object(service("reviews"))
    api.put_object(endpoint_slice("reviews", "10.1.0.1"))
    api.put_object(export("reviews"))
    src = await KubeSource.from_kubeconfig(cluster="east", kubeconfig=kubeconfig, context="east")
    async with src:
        async with asyncio.timeout(WAIT):
            first = await anext(aiter(src.watch()))
        lists = {k: r.stats.lists for k, r in src.reflectors.items()}
    assert addresses(first, "reviews") == [("10.1.0.1", True)]
    assert list(first.snapshot.exports) == [key("reviews")]
    assert lists == {"Service": 1, "EndpointSlice": 1, "ServiceExport": 1, "AuthorizationPolicy": 1,
                     "DestinationRule": 1, "VirtualService": 1}


async def test_watch_added_modified_deleted(api: KubeApiDouble, source: KubeSource) -> None:
    api.put_object(service("reviews"))
    api.put_object(endpoint_slice("reviews", "10.1.0.1"))
    api.put_object(export("reviews"))
    results = source.watch()
    await until(results, lambda r: key("reviews") in r.snapshot.exports and bool(addresses(r, "reviews")))
    lists_before = {k: r.stats.lists for k, r in source.reflectors.items()}

    api.put_object(service("details"))  # ADDED
    got = await until(results, lambda r: key("details") in r.snapshot.services)
    assert key("details") not in got.snapshot.exports

    api.put_object(endpoint_slice("reviews", "10.1.0.1", "10.1.0.3", ready=False))  # MODIFIED
    got = await until(results, lambda r: len(addresses(r, "reviews")) == 2)
    assert addresses(got, "reviews") == [("10.1.0.1", False), ("10.1.0.3", False)]

    api.put_object(service("reviews", port=9080))  # MODIFIED Service keeps its endpoints
    got = await until(results, lambda r: r.snapshot.services[key("reviews")].ports[0].port == 9080)
    assert len(addresses(got, "reviews")) == 2

    api.delete_object(MCS, "ServiceExport", "reviews")  # DELETED
    got = await until(results, lambda r: key("reviews") not in r.snapshot.exports)
    api.delete_object("v1", "Service", "details")
    got = await until(results, lambda r: key("details") not in r.snapshot.services)
    assert key("reviews") in got.snapshot.services
    # All of that came through the watches: nothing was relisted.
    assert {k: r.stats.lists for k, r in source.reflectors.items()} == lists_before
    assert all(r.stats.events >= 1 for k, r in source.reflectors.items() if k in CORE)


async def test_bookmark_advances_resource_version(api: KubeApiDouble, source: KubeSource) -> None:
    api.put_object(service("reviews"))
    await until(source.watch(), lambda r: key("reviews") in r.snapshot.services)
    await wait_until(lambda: api.stats.watches_open >= len(KINDS), "every watch open")
    # Writes to other kinds move the global version; only a bookmark tells the Service reflector about it.
    api.put_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "unrelated"}})
    newest = str(api.resource_version)
    assert source.resource_version("Service") != newest
    api.send_bookmarks()
    await wait_until(lambda: all(source.resource_version(k) == newest for k in source.reflectors),
                     "every reflector at the bookmark's version")
    assert all(r.stats.bookmarks >= 1 for r in source.reflectors.values())
    # The next watch resumes from the bookmarked version.
    api.close_watches()
    await wait_until(lambda: any(f"resourceVersion={newest}" in p and "watch=true" in p
                                 for _, p in list(api.requests)), "a watch resumed from the bookmark")


async def test_410_gone_relists_without_losing_objects(api: KubeApiDouble, source: KubeSource) -> None:
    for name in ("a", "b", "c"):
        api.put_object(service(name))
        api.put_object(export(name))
    api.put_object(endpoint_slice("a", "10.1.0.1"))
    results = source.watch()
    await until(results, lambda r: len(r.snapshot.exports) == 3 and bool(addresses(r, "a")))
    await wait_until(lambda: api.stats.watches_open >= len(KINDS), "every watch open")
    with api.atomically():
        # As if the API server restarted while etcd compacted: changes the watches never delivered.
        api.close_watches()
        api.put_object(service("d"))
        api.put_object(export("d"))
        api.delete_object("v1", "Service", "b")
        api.delete_object(MCS, "ServiceExport", "c")
        api.put_object(endpoint_slice("a", "10.1.0.1", "10.1.0.2"))
        api.compact()
    got = await until(results, lambda r: key("d") in r.snapshot.exports and key("b") not in r.snapshot.services
                      and key("c") not in r.snapshot.exports and len(addresses(r, "a")) == 2)
    assert sorted(str(k) for k in got.snapshot.services) == ["a.default", "c.default", "d.default"]
    assert sorted(str(k) for k in got.snapshot.exports) == ["a.default", "b.default", "d.default"]
    assert all(r.stats.gone >= 1 and r.stats.lists >= 2 for k, r in source.reflectors.items() if k in CORE)


async def test_410_as_http_status_on_a_live_watch(api: KubeApiDouble, source: KubeSource) -> None:
    api.put_object(service("a"))
    results = source.watch()
    await until(results, lambda r: key("a") in r.snapshot.services)
    await wait_until(lambda: api.stats.watches_open >= len(KINDS), "every watch open")
    with api.atomically():
        # The open watches are behind the compaction: the double ends them with an ERROR 410 event.
        api.put_object(service("b"))
        api.compact()
    got = await until(results, lambda r: key("b") in r.snapshot.services)
    assert key("a") in got.snapshot.services
    assert source.reflectors["Service"].stats.gone >= 1


async def test_a_watch_left_part_way_is_closed_not_pooled(api: KubeApiDouble, source: KubeSource,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The reflector leaves a watch at its ERROR event, before the server's end of the stream: that connection is
    closed, never handed back to the shared pool, where the next request on it would read the stream's end as
    its status line (urllib3 then retries it) or wait behind it (a reflector then could not stop: the fixture
    checks every reflector thread ended)."""
    caplog.set_level(logging.WARNING, logger="urllib3")
    api.put_object(service("a"))
    results = source.watch()
    await until(results, lambda r: key("a") in r.snapshot.services)
    await wait_until(lambda: api.stats.watches_open >= len(KINDS), "every watch open")
    ended = api.stats.connections_ended
    with api.atomically():
        api.put_object(service("b"))
        api.compact()
    await until(results, lambda r: key("b") in r.snapshot.services)
    await wait_until(lambda: api.stats.connections_ended > ended, "the connection of the watch left at its ERROR "
                     "event closed")
    assert source.reflectors["Service"].stats.gone >= 1
    assert [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")] == []


async def test_server_errors_back_off_and_recover(api: KubeApiDouble, kubeconfig: Path) -> None:
    api.put_object(service("a"))
    api.inject_error(4, code=500)  # the first lists fail
    src = await KubeSource.from_kubeconfig(cluster="east", kubeconfig=kubeconfig, context="east",
                                           backoff_base=0.05, backoff_cap=0.5)
    async with src:
        results = src.watch()
        await until(results, lambda r: key("a") in r.snapshot.services)
        assert sum(r.stats.errors for r in src.reflectors.values()) >= 1
        await wait_until(lambda: api.stats.watches_open >= len(KINDS), "every watch open")
        api.inject_error(6, code=503)  # every reconnect fails a few times
        api.close_watches()
        api.put_object(service("b"))
        got = await until(results, lambda r: key("b") in r.snapshot.services)
        assert key("a") in got.snapshot.services
        assert "503" in " ".join(r.stats.last_error for r in src.reflectors.values())
        errors = [err for err in api._errors if err.remaining]
        assert errors == []  # every injected failure was met, and the source got past them


async def test_the_event_loop_keeps_running_while_watches_block(api: KubeApiDouble, source: KubeSource) -> None:
    api.put_object(service("a"))
    await until(source.watch(), lambda r: key("a") in r.snapshot.services)
    await wait_until(lambda: api.stats.watches_open >= len(KINDS), "every watch open")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(50):
            await asyncio.sleep(0.01)
            ticks += 1

    # Every watch is open and idle (their reads block); if any read ran on the loop, this would never end.
    async with asyncio.timeout(WAIT):
        await ticker()
    assert ticks == 50
    assert api.stats.watches_open >= len(KINDS)


async def test_bad_object_is_reported_and_last_good_stays(api: KubeApiDouble, source: KubeSource) -> None:
    api.put_object(service("a"))
    results = source.watch()
    await until(results, lambda r: key("a") in r.snapshot.services)
    bad = service("a")
    bad["spec"]["ports"][0]["port"] = 70000
    api.put_object(bad)
    got = await until(results, lambda r: bool(r.problems))
    assert got.snapshot.services[key("a")].ports[0].port == 80
    assert "spec.ports[0].port" in got.problems[0].field
    assert "Service default/a" in got.problems[0].message
    api.put_object(service("a", port=81))
    got = await until(results, lambda r: not r.problems)
    assert got.snapshot.services[key("a")].ports[0].port == 81


async def test_create_and_delete_service_export(api: KubeApiDouble, kubeconfig: Path, source: KubeSource) -> None:
    client = await asyncio.to_thread(load_api_client, kubeconfig=kubeconfig, context="east")
    api.put_object(service("reviews", ns="shop"))
    assert await create_service_export(client, key("reviews", "shop")) is True
    stored = api.get_object(MCS, "ServiceExport", "reviews", "shop")
    assert stored is not None and stored["metadata"]["creationTimestamp"]
    got = await until(source.watch(), lambda r: key("reviews", "shop") in r.snapshot.exports)
    assert got.snapshot.exports[key("reviews", "shop")].cluster == "east"
    with pytest.raises(KubeAlreadyExists) as err:
        await create_service_export(client, key("reviews", "shop"))
    assert err.value.status == 409 and "already exists" in err.value.message
    assert await create_service_export(client, key("reviews", "shop"), exist_ok=True) is False
    assert get_service_export_sync(client, key("reviews", "shop")) is not None

    assert await delete_service_export(client, key("reviews", "shop")) is True
    assert api.get_object(MCS, "ServiceExport", "reviews", "shop") is None
    with pytest.raises(KubeNotFound):
        await delete_service_export(client, key("reviews", "shop"))
    assert await delete_service_export(client, key("reviews", "shop"), missing_ok=True) is False
    assert get_service_export_sync(client, key("reviews", "shop")) is None


def test_unknown_context_is_a_config_error(kubeconfig: Path) -> None:
    with pytest.raises(KubeConfigError, match="nowhere"):
        load_api_client(kubeconfig=kubeconfig, context="nowhere")
    with pytest.raises(KubeConfigError):
        load_api_client(kubeconfig=kubeconfig.parent / "missing", context="east")


async def test_http_410_on_a_watch_request_relists(api: KubeApiDouble, source: KubeSource) -> None:
    api.put_object(service("a"))
    results = source.watch()
    await until(results, lambda r: key("a") in r.snapshot.services)
    await wait_until(lambda: api.stats.watches_open >= len(KINDS), "every watch open")
    lists = source.reflectors["Service"].stats.lists
    # The reconnecting Service watch gets a plain HTTP 410 (as a list with an expired continue token would).
    api.inject_error(1, code=410, path_prefix="/api/v1/services", method="GET")
    api.close_watches()
    api.put_object(service("b"))
    got = await until(results, lambda r: key("b") in r.snapshot.services)
    assert key("a") in got.snapshot.services
    reflector = source.reflectors["Service"]
    assert reflector.stats.gone == 1 and reflector.stats.lists == lists + 1 and reflector.stats.errors == 0


async def test_namespaced_source_sees_only_its_namespace(api: KubeApiDouble, kubeconfig: Path) -> None:
    api.put_object(service("a", ns="shop"))
    api.put_object(export("a", ns="shop"))
    api.put_object(service("b", ns="other"))
    api.put_object(export("b", ns="other"))
    src = await KubeSource.from_kubeconfig(cluster="east", kubeconfig=kubeconfig, context="east", namespace="shop")
    async with src:
        results = src.watch()
        first = await until(results, lambda r: key("a", "shop") in r.snapshot.exports)
        assert list(first.snapshot.services) == [key("a", "shop")]
        assert list(first.snapshot.exports) == [key("a", "shop")]
        api.put_object(service("c", ns="other"))
        api.put_object(service("c", ns="shop"))
        got = await until(results, lambda r: key("c", "shop") in r.snapshot.services)
        assert key("c", "other") not in got.snapshot.services
    assert any("/namespaces/shop/serviceexports" in p for _, p in api.requests)


def test_backoff_is_jittered_bounded_and_resets() -> None:
    import random

    b = Backoff(base=0.1, cap=2.0, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(12)]
    for n, d in enumerate(delays):
        ceiling = min(2.0, 0.1 * 2**n)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 2.0 and len(set(delays)) == len(delays)
    b.reset()
    assert b.next_delay() <= 0.1


async def test_missing_serviceexport_crd_does_not_hold_back_services(api: KubeApiDouble, kubeconfig: Path) -> None:
    api.put_object(service("a"))
    api.put_object(export("a"))
    # As on a cluster without the MCS CRDs: every request for serviceexports is a 404 for a while.
    api.inject_error(5, code=404, path_prefix="/apis/multicluster.x-k8s.io/")
    src = await KubeSource.from_kubeconfig(cluster="east", kubeconfig=kubeconfig, context="east",
                                           backoff_base=0.05, backoff_cap=0.2)
    async with src:
        results = src.watch()
        first = await until(results, lambda r: key("a") in r.snapshot.services)
        assert first.snapshot.exports == {}
        # Once the kind is served, its objects arrive without a restart.
        got = await until(results, lambda r: key("a") in r.snapshot.exports)
        assert key("a") in got.snapshot.services
        # Each error is a round that found neither MCS version (v1beta1, then v1alpha1) served.
        stats = src.reflectors["ServiceExport"].stats
        assert 1 <= stats.errors < 5 and "404" in stats.last_error


async def test_two_consumers_both_see_changes(api: KubeApiDouble, source: KubeSource) -> None:
    one, two = source.watch(), source.watch()
    api.put_object(service("a"))
    r1 = await until(one, lambda r: key("a") in r.snapshot.services)
    r2 = await until(two, lambda r: key("a") in r.snapshot.services)
    assert r1.snapshot.version == r2.snapshot.version
    api.put_object(service("b"))
    assert key("b") in (await until(two, lambda r: key("b") in r.snapshot.services)).snapshot.services
    assert key("b") in (await until(one, lambda r: key("b") in r.snapshot.services)).snapshot.services


async def test_incremental_snapshots_equal_a_full_assembly() -> None:
    """Random changes fed straight into the source (no threads): every snapshot equals assembling the whole
    current state from scratch, and the version changes exactly when the content does."""
    import random

    from discovery import convert
    from discovery.kube.reflector import _Converted, _Delete, _Replace, _Upsert

    rng = random.Random(1645)
    src = KubeSource(api=None, cluster="east")
    cluster = src.cluster
    src._loop = asyncio.get_running_loop()
    live: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, namespace, name) -> object
    rv = 0

    def make(kind: str, i: int) -> dict[str, Any]:
        nonlocal rv
        rv += 1
        if kind == "Service":
            obj = service(f"s{i}", port=rng.choice([80, 81]))
        elif kind == "EndpointSlice":
            obj = endpoint_slice(f"s{i}", *[f"10.0.{i}.{j}" for j in range(rng.randint(0, 3))],
                                 name=f"s{i}-{rng.randint(0, 1)}")
        else:
            obj = export(f"s{i}")
            obj["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
        obj["metadata"]["resourceVersion"] = str(rv)
        return obj

    for kind in ("Service", "EndpointSlice", "ServiceExport"):
        src._apply(_Replace(kind, {}, "1"))
    versions: dict[str, str] = {}
    for step in range(300):
        kind = rng.choice(["Service", "EndpointSlice", "ServiceExport"])
        i = rng.randint(0, 7)
        obj = make(kind, i)
        ident = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if rng.random() < 0.3 and (kind, *ident) in live:
            live.pop((kind, *ident))
            src._apply(_Delete(kind, ident[0], ident[1], str(rv)))
        elif rng.random() < 0.05:
            # A relist of this kind with what is live now.
            objs = {(o["metadata"]["namespace"], o["metadata"]["name"]):
                    _Converted(convert.convert(o, cluster=cluster), o["metadata"]["resourceVersion"])
                    for (k, _, _), o in live.items() if k == kind}
            src._apply(_Replace(kind, objs, str(rv)))
        else:
            live[(kind, *ident)] = obj
            src._apply(_Upsert(kind, ident[0], ident[1],
                               _Converted(convert.convert(obj, cluster=cluster), str(rv)), str(rv)))
        if step % 7 == 0:
            result = await src._snapshot(src._gen)
            full = convert.assemble(convert.convert(o, cluster=cluster) for _, o in sorted(live.items()))
            assert dict(result.snapshot.services) == dict(full.services)
            assert dict(result.snapshot.exports) == dict(full.exports)
            content = repr((sorted(full.services.items()), sorted(full.exports.items())))
            assert versions.setdefault(result.snapshot.version, content) == content
