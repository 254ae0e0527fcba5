"""Fuzzing the federation's JSON decoding (issue 10): ``wire.loads`` and every decoder of ``federation.wire``, fed
arbitrary bytes, arbitrary JSON values and mutations of valid documents, raise nothing but ``WireError`` (whose
``field`` is a path string or None). Hostile shapes (huge numbers, deep nesting, NaN) are included. Bounded for CI."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.model import ClusterId
from federation import catalog as cat
from federation import wire
from federation.agent import export_set
from federation.records import Member
from tests.federation.fedkit import info, snapshot
from tests.security.fuzzkit import JSON, mutated

EAST = ClusterId("east")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _export_body() -> Any:
    services, exports = snapshot("east", ["a", "b"])
    return wire.export_set_json(export_set(info("east"), services, exports, generation=3))


def _catalog_body() -> Any:
    services, exports = snapshot("east", ["a", "b"])
    es = export_set(info("east"), services, exports, generation=3)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    member = Member(info=info("east"), registered_at=now, renewed_at=now, lease_ttl_s=10.0)
    catalog = cat.build(revision=4, members={EAST: member}, exports=[es])
    return json.loads(json.dumps(wire.catalog_json(catalog, now=now)))


EXPORTS = _export_body()
CATALOG = _catalog_body()
REGISTRATION = wire.registration_json(info("east"))
CHANGES = [wire.change_json(4, c) for c in cat.diff(cat.Catalog(revision=0), wire.catalog_from_json(CATALOG))] + \
    [wire.bookmark_json(4, leases={EAST: datetime(2026, 1, 1, tzinfo=UTC)})]
CHANGES = json.loads(json.dumps(CHANGES))

DECODERS: dict[str, Callable[[Any], object]] = {
    "export set": lambda v: wire.export_set_from_json(v, EAST, limits=wire.Limits(services=5, endpoints=5)),
    "registration": lambda v: wire.registration_from_json(v, EAST),
    "catalog": wire.catalog_from_json,
    "watch line": wire.change_from_json,
    "bookmark": wire.bookmark_leases_from_json,
    "member": wire.member_from_json,
}
SEEDS = {"export set": [EXPORTS], "registration": [REGISTRATION], "catalog": [CATALOG], "watch line": CHANGES,
         "bookmark": CHANGES[-1:], "member": CATALOG["members"]}


def _decode(name: str, value: Any) -> None:
    try:
        DECODERS[name](value)
    except wire.WireError as exc:
        assert exc.field is None or isinstance(exc.field, str)


def test_the_seeds_decode() -> None:
    for name, seeds in SEEDS.items():
        for seed in seeds:
            DECODERS[name](wire.loads(json.dumps(seed)))


@FUZZ
@given(name=st.sampled_from(sorted(DECODERS)), data=st.data())
def test_mutated_documents_raise_only_wire_errors(name: str, data: st.DataObject) -> None:
    _decode(name, data.draw(mutated(SEEDS[name])))


@FUZZ
@given(name=st.sampled_from(sorted(DECODERS)), value=JSON)
def test_arbitrary_values_raise_only_wire_errors(name: str, value: Any) -> None:
    _decode(name, value)


HOSTILE_TEXT = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    st.integers(1, 20_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 20_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(1, 6_000).map(lambda n: b'{"generation": ' + b"9" * n + b', "services": []}'),
    st.sampled_from([b"NaN", b"-Infinity", b"1e999", b'{"generation": 1e400}', b'"\\ud800"', b"\xef\xbb\xbf{}",
                     b'{"a": 1, "a": 2}', b"", b" ", b"null"]),
)


@FUZZ
@given(raw=HOSTILE_TEXT, name=st.sampled_from(sorted(DECODERS)))
def test_any_bytes_through_loads_and_a_decoder_raise_only_wire_errors(raw: bytes, name: str) -> None:
    try:
        value = wire.loads(raw)
    except wire.WireError as exc:
        assert exc.field is None or isinstance(exc.field, str)
        return
    _decode(name, value)


@FUZZ
@given(doc=mutated([EXPORTS]))
def test_the_mutated_wire_text_decodes_like_the_value(doc: Any) -> None:
    # Through the text form too: json.dumps of the mutated value, then loads and decode (what the service does).
    try:
        raw = json.dumps(doc, allow_nan=True).encode()
    except ValueError:
        return
    try:
        wire.export_set_from_json(wire.loads(raw), EAST)
    except wire.WireError:
        pass
