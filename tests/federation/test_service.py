"""The federation service over real mutual TLS, in-process, on the memory and SQLite stores: authentication and
authorization, validation errors naming the field, generations, watch resume and 410, network filtering."""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import aiohttp
import pytest

from discovery.model import ClusterId
from federation import wire
from federation.agent import export_set
from federation.client import BadRequest, Gone, NotRegistered, Refused, Unreachable
from federation.records import StaleGeneration
from federation.service import ServiceConfig, metrics_of, state_of
from federation.trust.spiffe import SpiffeId, TrustDomain
from tests.federation.fedkit import TD, Pki, eventually, in_process, info, key, snapshot

pytestmark = pytest.mark.timeout(60)


async def _raw(url: str, ctx: ssl.SSLContext, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(
        method, url + path, data=None if body is None else json.dumps(body),
        headers={"Content-Type": "application/json"}, ssl=ctx,
    ) as resp:
        text = await resp.read()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text.decode()


def _publish_body(cluster: str, names: list[str], generation: int) -> dict[str, Any]:
    services, exports = snapshot(cluster, names)
    es = export_set(info(cluster), services, exports, generation=generation)
    body: dict[str, Any] = wire.export_set_json(es)
    return body


async def test_register_publish_and_list_over_mtls(pki: Pki, store: Any) -> None:
    async with in_process(pki, store) as (url, app), pki.client("east", url) as east:
        member = await east.register(info("east"))
        assert member.info.id == "east" and member.unreachable_since is None
        services, exports = snapshot("east", ["reviews", "ratings"])
        revision = await east.publish(export_set(info("east"), services, exports, generation=1))
        assert revision > 0
        state = state_of(app)
        await eventually(lambda: state.revision >= revision)
        listing = await east.catalog()
        assert sorted(str(k) for k in listing.catalog.services) == ["ratings.default", "reviews.default"]
        reviews = listing.catalog.services[key("reviews")]
        assert reviews.import_.clusters == ("east",) and reviews.import_.ips
        shard = reviews.shard(ClusterId("east"))
        assert shard is not None and shard.gateway_host == "127.0.0.1" and shard.localities[0].ready == 1
        assert "BEGIN CERTIFICATE" in listing.trust_bundle_pem
        assert listing.catalog.members[ClusterId("east")].unreachable_since is None
        bundle = await east.trust_bundle()
        assert bundle["trustDomain"] == TD.name and bundle["jwks"]["keys"]


async def test_east_cannot_act_as_west(pki: Pki, store: Any) -> None:
    async with in_process(pki, store) as (url, app), pki.client("east", url) as east:
        await east.register(info("east"))
        ctx = pki.client_ssl("east")
        for method, path, body in (
            ("PUT", "/v1/clusters/west", wire.registration_json(info("west"))),
            ("POST", "/v1/clusters/west/heartbeat", None),
            ("PUT", "/v1/clusters/west/exports", _publish_body("west", ["reviews"], 1)),
            ("DELETE", "/v1/clusters/west", None),
        ):
            status, payload = await _raw(url, ctx, method, path, body)
            assert status == 403, (method, path, payload)
            assert "east may not act for cluster west" in payload["error"]
        # A body that speaks for west on east's own path is refused the same way.
        body = _publish_body("east", ["reviews"], 1)
        body["services"][0]["localities"][0]["cluster"] = "west"
        status, payload = await _raw(url, ctx, "PUT", "/v1/clusters/east/exports", body)
        assert status == 403 and payload["field"] == "services[0].localities[0].cluster"
        snap = await store.snapshot()
        assert [m.info.id for m in snap.members] == ["east"] and snap.exports == ()
        text = metrics_of(app).registry.get_sample_value("meshfed_federation_auth_failures_total",
                                                         {"reason": "wrong_cluster"})
        assert text == 5


async def test_leaf_claiming_another_cluster_is_refused(pki: Pki, store: Any) -> None:
    # A workload certificate (right root, east's intermediate) is not a cluster identity: 401.
    async with in_process(pki, store) as (url, _app):
        ctx = pki.client_ssl("east", identity=SpiffeId.workload(TD, "default", "sa"))
        status, payload = await _raw(url, ctx, "PUT", "/v1/clusters/east", wire.registration_json(info("east")))
        assert status == 401 and "identify a member cluster" in payload["error"]
        status, _ = await _raw(url, ctx, "GET", "/healthz")
        assert status == 200


async def test_foreign_root_refused_at_tls(pki: Pki, store: Any) -> None:
    foreign = Pki.create(TrustDomain("meshfed.test"))  # same trust domain name, different root key
    async with in_process(pki, store) as (url, _app), foreign.client("east", url) as east:
        with pytest.raises(Unreachable) as err:
            await east.register(info("east"))
        assert "SSL" in str(err.value) or "certificate" in str(err.value).lower()
        assert (await store.snapshot()).members == ()
        # And without any client certificate the handshake fails too.
        bare = ssl.create_default_context(cadata=pki.bundle.to_pem().decode())
        bare.check_hostname = False
        with pytest.raises(aiohttp.ClientError):
            await _raw(url, bare, "GET", "/v1/catalog")


async def test_malformed_bodies_name_the_field(pki: Pki, store: Any) -> None:
    async with in_process(pki, store) as (url, _app), pki.client("east", url) as east:
        await east.register(info("east"))
        ctx = pki.client_ssl("east")
        good = _publish_body("east", ["a", "b", "c"], 5)
        bad_port = json.loads(json.dumps(good))
        bad_port["services"][2]["ports"][0]["port"] = 70000
        bad_name = json.loads(json.dumps(good))
        bad_name["services"][1]["name"] = "Not_A_Label"
        bad_gen = dict(good, generation="seven")
        bad_addr = json.loads(json.dumps(good))
        bad_addr["services"][0]["endpoints"][0]["address"] = "not-an-ip"
        cases = [
            (bad_port, "services[2].ports[0].port"),
            (bad_name, "services[1].name"),
            (bad_gen, "generation"),
            (bad_addr, "services[0].endpoints[0].address"),
            ({"services": []}, "generation"),
        ]
        for body, field in cases:
            status, payload = await _raw(url, ctx, "PUT", "/v1/clusters/east/exports", body)
            assert status == 400, payload
            assert payload["field"] == field, payload
        for body, field in (({"network": "Bad Net"}, "network"),
                            ({"network": "n1", "gateway": {"host": "bad host"}}, "gateway.host"),
                            ({"network": "n1", "gateway": {"host": "gw.example", "port": 0}}, "gateway.port")):
            status, payload = await _raw(url, ctx, "PUT", "/v1/clusters/east", body)
            assert status == 400 and payload["field"] == field, payload
        async with aiohttp.ClientSession() as http, http.put(url + "/v1/clusters/east/exports", data=b"{nope",
                                                             ssl=ctx) as resp:
            assert resp.status == 400 and "not JSON" in (await resp.json())["error"]
        # Nothing was stored by any of them; a good publish after them is accepted.
        assert (await store.snapshot()).exports == ()
        status, payload = await _raw(url, ctx, "PUT", "/v1/clusters/east/exports", good)
        assert status == 200 and payload["generation"] == 5


async def test_generations_stale_and_idempotent(pki: Pki, store: Any) -> None:
    async with in_process(pki, store) as (url, _app), pki.client("east", url) as east:
        services, exports = snapshot("east", ["reviews"])
        with pytest.raises(NotRegistered):
            await east.publish(export_set(info("east"), services, exports, generation=1))
        await east.register(info("east"))
        es = export_set(info("east"), services, exports, generation=7)
        rev = await east.publish(es)
        assert await east.publish(es) == rev  # same generation, same content: idempotent
        with pytest.raises(StaleGeneration) as err:
            await east.publish(export_set(info("east"), services, exports, generation=6))
        assert (err.value.got, err.value.stored) == (6, 7)
        status, payload = await _raw(url, pki.client_ssl("east"), "PUT", "/v1/clusters/east/exports",
                                     _publish_body("east", ["other"], 3))
        assert status == 409 and payload["generation"] == 3 and payload["storedGeneration"] == 7
        assert (await store.snapshot()).exports[0].generation == 7


async def test_watch_streams_changes_and_old_revision_is_gone(pki: Pki, store: Any) -> None:
    config = ServiceConfig(lease_ttl_s=5.0, bookmark_interval_s=0.5, history=3)
    async with in_process(pki, store, config=config) as (url, app), pki.client("east", url) as east:
        await east.register(info("east"))
        state = state_of(app)
        await eventually(lambda: state.revision > 0)
        start = (await east.catalog()).catalog
        seen: list[tuple[int, list[Any]]] = []
        services, exports = snapshot("east", ["one"])
        rev = await east.publish(export_set(info("east"), services, exports, generation=1))
        async for revision, changes in east.watch(revision=start.revision):
            seen.append((revision, changes))
            if revision >= rev:
                break
        names = [str(c.key) for _, cs in seen for c in cs if hasattr(c, "key")]
        assert "one.default" in names
        assert [r for r, _ in seen] == sorted(r for r, _ in seen)
        for gen in range(2, 8):  # more batches than the history keeps
            services, exports = snapshot("east", [f"s{gen}"])
            last = await east.publish(export_set(info("east"), services, exports, generation=gen))
            await eventually(lambda last=last: state.revision >= last)  # type: ignore[misc]
        with pytest.raises(Gone):
            async for _ in east.watch(revision=start.revision):
                pass
        with pytest.raises(BadRequest):
            await east._call("GET", "/v1/catalog/watch?revision=abc", what="watch")


async def test_pod_addresses_only_for_same_network(pki: Pki, store: Any) -> None:
    async with in_process(pki, store) as (url, app), pki.client("east", url) as east, \
            pki.client("west", url) as west, pki.client("south", url) as south:
        await east.register(info("east", "net1"))
        await west.register(info("west", "net1"))
        await south.register(info("south", "net2"))
        services, exports = snapshot("east", ["reviews"])
        rev = await east.publish(export_set(info("east", "net1"), services, exports, generation=1))
        await eventually(lambda: state_of(app).revision >= rev)
        same = (await west.catalog()).catalog.services[key("reviews")].shard(ClusterId("east"))
        other = (await south.catalog()).catalog.services[key("reviews")].shard(ClusterId("east"))
        assert same is not None and other is not None
        assert [e.address for e in same.endpoints] == ["10.1.0.1"]
        assert other.endpoints == () and other.localities == same.localities and other.gateway_host == "127.0.0.1"


async def test_lease_expiry_withdraws_and_heartbeat_restores(pki: Pki, store: Any) -> None:
    config = ServiceConfig(lease_ttl_s=1.0, bookmark_interval_s=0.5)
    async with in_process(pki, store, config=config) as (url, app), pki.client("east", url) as east, \
            pki.client("west", url) as west:
        await east.register(info("east"))
        await west.register(info("west"))
        services, exports = snapshot("east", ["reviews"])
        await east.publish(export_set(info("east"), services, exports, generation=1))
        state = state_of(app)
        await eventually(lambda: key("reviews") in state.catalog.services)
        # west keeps heartbeating, east stops: east goes unreachable and its export leaves the catalog.
        for _ in range(200):
            await west.heartbeat()
            if key("reviews") not in state.catalog.services:
                break
            await asyncio.sleep(0.1)
        assert key("reviews") not in state.catalog.services
        member = (await west.catalog()).catalog.members[ClusterId("east")]
        assert member.unreachable_since is not None
        assert (await store.snapshot()).exports[0].services  # the stored exports are kept
        await east.heartbeat()
        await eventually(lambda: key("reviews") in state.catalog.services)
        assert (await west.catalog()).catalog.members[ClusterId("east")].unreachable_since is None


async def test_health_ready_metrics(pki: Pki, store: Any) -> None:
    async with in_process(pki, store) as (url, app), pki.client("east", url) as east:
        await east.register(info("east"))
        await eventually(lambda: state_of(app).started.is_set())
        ctx = pki.client_ssl("east")
        assert (await _raw(url, ctx, "GET", "/healthz")) == (200, {"status": "ok"})
        status, payload = await _raw(url, ctx, "GET", "/readyz")
        assert status == 200 and payload["status"] == "ready"
        status, text = await _raw(url, ctx, "GET", "/metrics")
        assert status == 200 and "meshfed_federation_requests_total" in text
        assert 'meshfed_federation_members{state="connected"} 1.0' in text


async def test_refused_errors_surface_in_client(pki: Pki, store: Any) -> None:
    async with in_process(pki, store) as (url, _app):
        client = pki.client("east", url)
        client.cluster = ClusterId("west")  # a buggy caller: east's certificate, west's paths
        async with client:
            with pytest.raises(Refused) as err:
                await client.register(info("west"))
            assert err.value.status == 403


async def test_client_refuses_a_server_that_is_not_the_federation(pki: Pki, store: Any) -> None:
    # A server presenting a valid certificate of the trust domain, but a cluster's, not the federation's.
    from datetime import timedelta

    from aiohttp import web

    from federation.service import create_app, serve
    from federation.trust.ca import issue_workload
    from federation.trust.tls import server_ssl_context
    from tests.support.procs import free_port

    key_pem, chain = issue_workload(pki.cluster_ca("mallory"), SpiffeId.cluster(TD, "mallory"),
                                    ttl=timedelta(hours=1))
    impostor_ctx = server_ssl_context(b"".join(chain), key_pem, pki.bundle)
    app: web.Application = create_app(store=store, bundle=lambda: pki.bundle)
    port = free_port()
    async with serve(app, host="127.0.0.1", port=port, ssl_context=impostor_ctx, shutdown_timeout=0.2), \
            pki.client("east", f"https://127.0.0.1:{port}") as east:
        with pytest.raises(Refused) as err:
            await east.register(info("east"))
        assert "not the federation service" in str(err.value)
