"""The OpenAPI document matches the server: every route of the app is documented and every documented route
exists, and the responses of a real session (success and error cases, the NDJSON watch stream) validate against
the documented schemas for their status code."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from federation import wire
from federation.agent import export_set
from federation.service import ServiceConfig, state_of
from federation.service.openapi import document
from federation.store.sqlite import SqliteStore
from federation.trust.spiffe import SpiffeId
from tests.federation.fedkit import TD, Pki, eventually, in_process, info, snapshot

pytestmark = pytest.mark.timeout(60)


def _app_routes(app: Any) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # aiohttp adds HEAD beside every GET
        out.add((route.method.lower(), route.resource.canonical))
    return out


def _doc_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, ops in doc["paths"].items() for method in ops}


def test_document_is_well_formed() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert name
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    names = set(doc["components"]["schemas"])
    assert refs and {r.rsplit("/", 1)[1] for r in refs} <= names


class Checker:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.checked: set[tuple[str, str, int]] = set()

    def schema_for(self, method: str, path: str, status: int, media: str) -> dict[str, Any]:
        op = self.doc["paths"][path][method]
        assert str(status) in op["responses"], f"{method.upper()} {path} answered {status}, which is not documented"
        content = op["responses"][str(status)].get("content", {})
        assert media in content, f"{method.upper()} {path} {status}: {media} not documented ({list(content)})"
        return {**content[media]["schema"], "components": self.doc["components"]}

    def check(self, method: str, path: str, status: int, body: Any, media: str = "application/json") -> None:
        schema = self.schema_for(method, path, status, media)
        jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)
        self.checked.add((method, path, status))


async def _call(url: str, ctx: ssl.SSLContext, method: str, path: str, body: Any = None,
                raw: bytes | None = None) -> tuple[int, str, bytes]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    async with aiohttp.ClientSession() as http, http.request(method, url + path, data=data, ssl=ctx,
                                                             headers={"Content-Type": "application/json"}) as resp:
        return resp.status, resp.content_type, await resp.read()


async def test_server_matches_document(tmp_path: Path) -> None:
    pki = Pki.create()
    store = SqliteStore(str(tmp_path / "fed.db"))
    config = ServiceConfig(lease_ttl_s=5.0, bookmark_interval_s=0.3, history=2)
    checker = Checker(document())
    try:
        async with in_process(pki, store, config=config) as (url, app):
            assert _app_routes(app) == _doc_routes(checker.doc)
            east = pki.client_ssl("east")
            west = pki.client_ssl("west")
            workload = pki.client_ssl("east", identity=SpiffeId.workload(TD, "default", "sa"))

            async def call(ctx: ssl.SSLContext, method: str, template: str, path: str | None = None,
                           body: Any = None, raw: bytes | None = None, expect: int | None = None) -> Any:
                status, media, payload = await _call(url, ctx, method, path or template, body, raw)
                if expect is not None:
                    assert status == expect, (method, path or template, status, payload[:300])
                if media == "application/json":
                    doc = json.loads(payload)
                    checker.check(method.lower(), template, status, doc, media)
                    return doc
                checker.schema_for(method.lower(), template, status, media)
                checker.checked.add((method.lower(), template, status))
                return payload.decode()

            reg = wire.registration_json(info("east"))
            await call(east, "PUT", "/v1/clusters/{cluster}", "/v1/clusters/east", reg, expect=200)
            await call(west, "PUT", "/v1/clusters/{cluster}", "/v1/clusters/west", wire.registration_json(
                info("west", "net2")), expect=200)
            await call(west, "PUT", "/v1/clusters/{cluster}", "/v1/clusters/east", reg, expect=403)
            await call(workload, "PUT", "/v1/clusters/{cluster}", "/v1/clusters/east", reg, expect=401)
            await call(east, "PUT", "/v1/clusters/{cluster}", "/v1/clusters/east", {"network": 5}, expect=400)
            await call(east, "POST", "/v1/clusters/{cluster}/heartbeat", "/v1/clusters/east/heartbeat", expect=200)
            await call(east, "POST", "/v1/clusters/{cluster}/heartbeat", "/v1/clusters/west/heartbeat", expect=403)
            services, exports = snapshot("east", ["reviews", "ratings"])
            body = wire.export_set_json(export_set(info("east"), services, exports, generation=3))
            exports_path = "/v1/clusters/east/exports"
            await call(east, "PUT", "/v1/clusters/{cluster}/exports", exports_path, body, expect=200)
            await call(east, "PUT", "/v1/clusters/{cluster}/exports", exports_path, dict(body, generation=2),
                       expect=409)
            await call(east, "PUT", "/v1/clusters/{cluster}/exports", exports_path, raw=b"[", expect=400)
            await call(west, "PUT", "/v1/clusters/{cluster}/exports", exports_path, body, expect=403)
            state = state_of(app)
            await eventually(lambda: len(state.catalog.services) == 2)
            listing = await call(west, "GET", "/v1/catalog", expect=200)
            await call(workload, "GET", "/v1/catalog", expect=401)
            assert {s["name"] for s in listing["services"]} == {"reviews", "ratings"}
            await call(east, "GET", "/v1/trust-bundle", expect=200)
            peers = await call(east, "GET", "/v1/peers", expect=200)
            assert peers == {"peers": [], "version": 0}  # no peers declared
            status = await call(east, "GET", "/v1/trust/status", expect=200)
            assert status["serving"] is None and {c["cluster"] for c in status["connections"]} >= {"east"}
            await call(east, "GET", "/healthz", expect=200)
            await call(east, "GET", "/readyz", expect=200)
            await call(east, "GET", "/metrics", expect=200)
            await call(east, "GET", "/v1/openapi.json", expect=200)
            await call(east, "GET", "/v1/catalog/watch", "/v1/catalog/watch?revision=x", expect=400)

            # The watch stream: every line validates as a WatchLine.
            start = listing["revision"]
            services, exports = snapshot("east", ["details"])
            body = wire.export_set_json(export_set(info("east"), services, exports, generation=4))
            await call(east, "PUT", "/v1/clusters/{cluster}/exports", exports_path, body, expect=200)
            lines: list[Any] = []
            schema = checker.schema_for("get", "/v1/catalog/watch", 200, "application/x-ndjson")
            async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/catalog/watch?revision={start}",
                                                                 ssl=west) as resp:
                assert resp.status == 200 and resp.content_type == "application/x-ndjson"
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    *done, buffer = buffer.split(b"\n")
                    lines.extend(json.loads(x) for x in done if x)
                    if any(x["type"] == "bookmark" and x["revision"] > start for x in lines):
                        break
            for line in lines:
                jsonschema.validate(line, schema, cls=jsonschema.Draft202012Validator)
            assert {x["type"] for x in lines} >= {"service", "bookmark"}
            checker.checked.add(("get", "/v1/catalog/watch", 200))
            for gen in range(5, 9):  # move the history past `start`
                services, exports = snapshot("east", [f"s{gen}"])
                body = wire.export_set_json(export_set(info("east"), services, exports, generation=gen))
                await call(east, "PUT", "/v1/clusters/{cluster}/exports", exports_path, body, expect=200)
            await eventually(lambda: state.oldest > start)
            await call(east, "GET", "/v1/catalog/watch", f"/v1/catalog/watch?revision={start}", expect=410)
            await call(east, "DELETE", "/v1/clusters/{cluster}", "/v1/clusters/east", expect=200)
            await call(east, "DELETE", "/v1/clusters/{cluster}", "/v1/clusters/east", expect=404)
            await call(east, "POST", "/v1/clusters/{cluster}/heartbeat", "/v1/clusters/east/heartbeat", expect=404)
            await call(east, "PUT", "/v1/clusters/{cluster}/exports", exports_path, body, expect=404)
        # Every documented route was exercised at least once with its success code.
        for method, path in _doc_routes(checker.doc):
            assert any((m, p) == (method, path) for m, p, s in checker.checked if s < 300), (method, path)
    finally:
        await store.close()
