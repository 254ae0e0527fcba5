"""The MCS v1beta1 fields across the federation: traits, exported labels/annotations and condition times
encode and decode, a peer's JSON without them still decodes to the defaults (compatible both ways), the documented
schemas accept them; and a member stamps the federation's unstamped conditions, Pending while it waits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jsonschema
import pytest

from discovery import mcs
from discovery.model import (
    ClusterId,
    Condition,
    ConditionStatus,
    Registry,
    Service,
    ServiceExport,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceTraits,
    ServiceType,
)
from federation import wire
from federation.catalog import Catalog, CatalogService, with_export_conditions
from federation.records import ExportedService
from federation.service.openapi import document

EAST = ClusterId("east")
KEY = ServiceKey.parse("reviews.default")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TRAITS = ServiceTraits(session_affinity="ClientIP", affinity_timeout=60, internal_traffic_policy="Local",
                       traffic_distribution="PreferClose", ip_families=("IPv6", "IPv4"))


def _schema(name: str) -> jsonschema.Draft202012Validator:
    doc = document()
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **doc})


def test_exported_service_round_trips_and_old_json_decodes() -> None:
    s = ExportedService(key=KEY, type=ServiceType.CLUSTER_SET_IP, ports=(ServicePort(port=9080, name="http"),),
                        created=T0, localities=(), traits=TRAITS, exported_labels=(("tier", "gold"),),
                        exported_annotations=(("team", "x"),))
    body = wire.exported_service_json(s)
    assert body["sessionAffinity"] == "ClientIP" and body["exportedLabels"] == {"tier": "gold"}
    _schema("ExportedService").validate(body)
    assert wire.exported_service_from_json(body, "services[0]", cluster=EAST) == s
    old = {k: v for k, v in body.items() if k not in {"sessionAffinity", "sessionAffinityTimeoutSeconds",
                                                       "internalTrafficPolicy", "trafficDistribution",
                                                       "ipFamilies", "exportedLabels", "exportedAnnotations"}}
    decoded = wire.exported_service_from_json(old, "services[0]", cluster=EAST)
    assert decoded.traits == ServiceTraits() and decoded.exported_labels == ()
    # defaults are left out, so an unchanged service sends exactly the JSON an old peer sent
    plain = ExportedService(key=KEY, type=ServiceType.CLUSTER_SET_IP, ports=(ServicePort(port=9080),), created=T0,
                            localities=())
    assert set(wire.exported_service_json(plain)) == {"namespace", "name", "type", "ports", "created",
                                                      "localities", "endpoints"}


@pytest.mark.parametrize(("change", "field"), [
    ({"sessionAffinity": "Cookie"}, "services[0]"),
    ({"ipFamilies": ["IPv4", 4]}, "services[0].ipFamilies[1]"),
    ({"exportedLabels": {"tier": 1}}, "services[0].exportedLabels.tier"),
    ({"sessionAffinityTimeoutSeconds": 90000}, "services[0].sessionAffinityTimeoutSeconds"),
])
def test_bad_trait_fields_are_named(change: dict[str, object], field: str) -> None:
    s = ExportedService(key=KEY, type=ServiceType.CLUSTER_SET_IP, ports=(ServicePort(port=9080),), created=T0,
                        localities=())
    with pytest.raises(wire.WireError) as info:
        wire.exported_service_from_json({**wire.exported_service_json(s), **change}, "services[0]", cluster=EAST)
    assert info.value.field == field


def test_catalog_service_carries_import_fields_and_condition_times() -> None:
    imp = ServiceImport(key=KEY, type=ServiceType.CLUSTER_SET_IP, ports=(ServicePort(port=9080),), clusters=(EAST,),
                        ips=("241.0.0.9",), traits=TRAITS, labels=(("tier", "gold"),), annotations=(("a", "b"),))
    cond = Condition(mcs.CONFLICT, ConditionStatus.FALSE, "NoConflicts", "", observed_generation=2,
                     last_transition_time=T0)
    svc = CatalogService(import_=imp, conditions=((EAST, cond),))
    body = wire.catalog_service_json(svc)
    _schema("CatalogService").validate(body)
    assert wire.catalog_service_from_json(body, "services[0]") == svc
    for k in ("sessionAffinity", "labels", "annotations", "ipFamilies"):
        del body[k]
    del body["conditions"][0]["lastTransitionTime"]
    old = wire.catalog_service_from_json(body, "services[0]")
    assert old.import_.labels == () and old.import_.traits.session_affinity == "None"
    assert old.conditions[0][1].last_transition_time is None


def _registry(*exports: ServiceExport) -> Registry:
    svc = Service(cluster=EAST, key=KEY, ports=(ServicePort(port=9080),))
    return Registry(local=EAST).with_shard(EAST, [svc], list(exports))


def test_member_stamps_central_conditions_and_keeps_times() -> None:
    t1, t2 = T0 + timedelta(days=1), T0 + timedelta(days=2)
    central = Condition(mcs.CONFLICT, ConditionStatus.TRUE, "PortConflict", "conflict on port 9080")
    imp = ServiceImport(key=KEY, type=ServiceType.CLUSTER_SET_IP, ports=(ServicePort(port=9080),), clusters=(EAST,))
    catalog = Catalog(revision=1, services={KEY: CatalogService(import_=imp, conditions=((EAST, central),))})
    export = ServiceExport(cluster=EAST, key=KEY, created=T0, generation=5)
    once = with_export_conditions(_registry(export), catalog, now=t1)
    [c] = once.exports[EAST][KEY].conditions
    assert (c.last_transition_time, c.observed_generation) == (t1, 5)
    # a fresh snapshot (exports without conditions) keeps the time through ``previous``
    again = with_export_conditions(_registry(export), catalog, now=t2, previous=once.exports[EAST])
    assert again.exports[EAST][KEY].conditions[0].last_transition_time == t1


def test_valid_export_missing_from_the_catalog_is_pending() -> None:
    export = ServiceExport(cluster=EAST, key=KEY, created=T0)
    updated = with_export_conditions(_registry(export), Catalog(revision=1, services={}), now=T0)
    by_type = {c.type: c for c in updated.exports[EAST][KEY].conditions}
    assert (by_type["Valid"].status, by_type["Valid"].reason) == (ConditionStatus.TRUE, "Valid")
    assert (by_type["Ready"].status, by_type["Ready"].reason) == (ConditionStatus.FALSE, "Pending")
    assert "Conflict" not in by_type  # not evaluated until the federation has every export
