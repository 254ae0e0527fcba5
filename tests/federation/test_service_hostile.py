"""Hostile and oversized bodies over real mutual TLS: every one is a 4xx naming the field (or the limit), never a
500, and none of them changes what was already stored (issue 10, items 2 and 4)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from federation import wire
from federation.agent import export_set
from federation.service import ServiceConfig
from federation.store.sqlite import SqliteStore
from tests.federation.fedkit import Pki, in_process, info, snapshot

pytestmark = pytest.mark.timeout(120)


async def _send(url: str, ctx: ssl.SSLContext, path: str, data: bytes, *, method: str = "PUT") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(
        method, url + path, data=data, headers={"Content-Type": "application/json"}, ssl=ctx) as resp:
        raw = await resp.read()
        assert resp.content_type == "application/json", raw[:200]
        return resp.status, json.loads(raw)


def _body(names: list[str], generation: int) -> dict[str, Any]:
    services, exports = snapshot("east", names)
    out: dict[str, Any] = wire.export_set_json(export_set(info("east"), services, exports, generation=generation))
    return out


def _text(body: Any) -> bytes:
    return json.dumps(body).encode()


def _deep(levels: int) -> bytes:
    return b'{"generation": 7, "services": [' + b"[" * levels + b"]" * levels + b"]}"


HUGE = "9" * 5000

HOSTILE: list[tuple[str, bytes, str | None]] = [
    ("5000-digit generation", _text(_body(["a"], 7)).replace(b'"generation": 7', f'"generation": {HUGE}'.encode()),
     "generation"),
    ("5000-digit port", _text(_body(["a"], 7)).replace(b'"port": 8080', f'"port": {HUGE}'.encode()),
     "services[0].ports[0].port"),
    ("1e999 ready count", _text(_body(["a"], 7)).replace(b'"ready": 1', b'"ready": 1e999'),
     "services[0].localities[0].ready"),
    ("NaN generation", _text(_body(["a"], 7)).replace(b'"generation": 7', b'"generation": NaN'), "generation"),
    ("nested 100,000 levels", _deep(100_000), "services[0]" + "[0]" * (wire.MAX_DEPTH - 2)),
    ("nested 200 levels", _deep(200), "services[0]" + "[0]" * (wire.MAX_DEPTH - 2)),
    ("not JSON", b"{nope", None),
    ("not UTF-8", b'{"generation": "\xff\xfe"}', None),
    ("empty body", b"", None),
    ("unknown top-level field", _text(dict(_body(["a"], 7), generaton=8)), "generaton"),
    ("unknown service field", _text(_body(["a"], 7)).replace(b'"name": "a"', b'"name": "a", "colour": "red"'),
     "services[0].colour"),
    ("unknown port field", _text(_body(["a"], 7)).replace(b'"port": 8080', b'"port": 8080, "portt": 1'),
     "services[0].ports[0].portt"),
]


@pytest.mark.parametrize(("case", "data", "field"), HOSTILE, ids=[c[0] for c in HOSTILE])
async def test_hostile_publish_bodies_are_400_naming_the_field(pki: Pki, tmp_path: Path, case: str, data: bytes,
                                                               field: str | None) -> None:
    async with SqliteStore(tmp_path / "fed.db") as store, in_process(pki, store) as (url, _app), \
            pki.client("east", url) as east:
        await east.register(info("east"))
        ctx = pki.client_ssl("east")
        status, payload = await _send(url, ctx, "/v1/clusters/east/exports", _text(_body(["kept"], 5)))
        assert status == 200, payload
        status, payload = await _send(url, ctx, "/v1/clusters/east/exports", data)
        assert status == 400, (case, payload)
        assert payload["field"] == field, (case, payload)
        assert set(payload) == {"error", "field"}
        # Nothing accepted before was lost.
        (stored,) = (await store.snapshot()).exports
        assert stored.generation == 5 and [s.key.name for s in stored.services] == ["kept"]


async def test_hostile_registration_bodies(pki: Pki, tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "fed.db") as store, in_process(pki, store) as (url, _app):
        ctx = pki.client_ssl("east")
        for data, field in ((b'{"network": "n1", "gateway": {"host": "gw", "port": ' + HUGE.encode() + b"}}",
                             "gateway.port"),
                            (b'{"network": "n1", "netwrok": "n2"}', "netwrok"),
                            (b'{"network": "n1", "gateway": {"hots": "gw"}}', "gateway.hots"),
                            (b"[" * 50_000 + b"]" * 50_000, "[0]" * wire.MAX_DEPTH),
                            (b"[" * 100 + b"]" * 100, "[0]" * wire.MAX_DEPTH),
                            (b"not json", None)):
            status, payload = await _send(url, ctx, "/v1/clusters/east", data)
            assert status == 400 and payload["field"] == field, payload
        assert (await store.snapshot()).members == ()


async def test_publish_limits_answer_413_and_422_naming_the_limit(pki: Pki, tmp_path: Path) -> None:
    limits = wire.Limits(services=3, endpoints=2, body_bytes=64 * 1024)
    config = ServiceConfig(lease_ttl_s=5.0, limits=limits)
    async with SqliteStore(tmp_path / "fed.db") as store, in_process(pki, store, config=config) as (url, _app), \
            pki.client("east", url) as east:
        await east.register(info("east"))
        ctx = pki.client_ssl("east")
        status, payload = await _send(url, ctx, "/v1/clusters/east/exports", _text(_body(["a", "b", "c"], 5)))
        assert status == 200, payload

        status, payload = await _send(url, ctx, "/v1/clusters/east/exports", _text(_body(["a", "b", "c", "d"], 6)))
        assert status == 422, payload
        assert payload["limit"] == "maxServices" and payload["maximum"] == 3 and payload["field"] == "services"

        many = _body(["a"], 7)
        many["services"][0]["endpoints"] = [{"address": f"10.0.0.{i}"} for i in range(1, 4)]
        status, payload = await _send(url, ctx, "/v1/clusters/east/exports", _text(many))
        assert status == 422, payload
        assert payload["limit"] == "maxEndpoints" and payload["maximum"] == 2
        assert payload["field"] == "services[0].endpoints"

        big = _text(_body(["a", "b"], 8)) + b" " * 70_000  # valid JSON, but over the byte limit
        status, payload = await _send(url, ctx, "/v1/clusters/east/exports", big)
        assert status == 413, payload
        assert payload["limit"] == "maxBodyBytes" and payload["maximum"] == 64 * 1024 and payload["field"] is None

        # What was accepted before all three is still there, and the limits did not stop a good publish.
        (stored,) = (await store.snapshot()).exports
        assert stored.generation == 5 and len(stored.services) == 3
        status, payload = await _send(url, ctx, "/v1/clusters/east/exports", _text(_body(["x"], 9)))
        assert status == 200, payload


def test_loads_keeps_unrepresentable_numbers_for_the_decoder_to_name() -> None:
    value = wire.loads('{"generation": ' + HUGE + ', "x": 1e999, "y": -Infinity, "z": 12}')
    assert value["generation"] == wire.Unrepresentable(HUGE) and value["z"] == 12
    assert all(isinstance(value[k], wire.Unrepresentable) for k in ("x", "y"))
    with pytest.raises(wire.WireError) as caught:
        wire.export_set_from_json(wire.loads('{"generation": ' + HUGE + ', "services": []}'), info("east").id)
    assert caught.value.field == "generation" and "out of range" in caught.value.reason
    for text in ("[" * 10_000, '{"a": [' * 5_000, "\ud800", "nul"):
        with pytest.raises(wire.WireError):
            wire.loads(text)


async def test_client_reports_a_publish_over_a_limit_as_over_limit(pki: Pki, tmp_path: Path) -> None:
    from federation.client import OverLimit

    config = ServiceConfig(lease_ttl_s=5.0, limits=wire.Limits(services=2))
    async with SqliteStore(tmp_path / "fed.db") as store, in_process(pki, store, config=config) as (url, _app), \
            pki.client("east", url) as east:
        await east.register(info("east"))
        services, exports = snapshot("east", ["a", "b", "c"])
        with pytest.raises(OverLimit) as caught:
            await east.publish(export_set(info("east"), services, exports, generation=3))
        assert caught.value.limit == "maxServices" and caught.value.maximum == 2 and caught.value.status == 422


def test_big_bodies_are_parsed_in_pieces_with_the_same_answers() -> None:
    # Over wire._PIECES_OVER characters a body is parsed piece by piece (so no single json call holds the GIL for
    # long): same values, same errors, same fields named.
    body = _body([f"s{i}" for i in range(1500)], 7)
    text = json.dumps(body, indent=1)
    assert len(text) > wire._PIECES_OVER
    assert wire.loads(text) == json.loads(text)
    pad = " " * wire._PIECES_OVER
    with pytest.raises(wire.WireError) as caught:
        wire.export_set_from_json(wire.loads(pad + text.replace('"generation": 7', f'"generation": {HUGE}') + pad),
                                  info("east").id)
    assert caught.value.field == "generation"
    deep = _deep(200_000)
    assert len(deep) > wire._PIECES_OVER
    with pytest.raises(wire.WireError) as caught:
        wire.loads(deep)
    assert caught.value.field == "services[0]" + "[0]" * (wire.MAX_DEPTH - 2)
    for bad, field in ((text[:-1], None), (text + "x", None), (text.replace("[", "[,", 1), None)):
        with pytest.raises(wire.WireError) as caught:
            wire.loads(bad)
        assert caught.value.field == field


async def test_hostile_watch_revisions_are_400_naming_it(pki: Pki, tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "fed.db") as store, in_process(pki, store) as (url, _app):
        ctx = pki.client_ssl("east")
        for raw in (HUGE, "-1", "1e3", "NaN", ""):
            async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/catalog/watch?revision={raw}",
                                                                 ssl=ctx) as resp:
                assert resp.status == 400, (raw, await resp.text())
                assert (await resp.json())["field"] == "revision"
