"""The manifest source and clusterset.yaml: the demo clusterset, malformed files (last good state stays in force),
and watching a folder for changes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import MappingProxyType
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from discovery import convert as cv
from discovery.clusterset import ClusterSetError, load_clusterset, parse_clusterset
from discovery.manifests import ManifestSource, load_clusterset_manifests
from discovery.model import ClusterId, ServiceKey, ServiceType
from discovery.source import ERROR, WARNING, LoadResult

DEMO = Path(__file__).resolve().parents[2] / "clusters" / "demo"
REVIEWS = ServiceKey.parse("reviews.default")
RATINGS = ServiceKey.parse("ratings.default")
DETAILS = ServiceKey.parse("details.default")
DB = ServiceKey.parse("db.default")
ECHO_GRPC = ServiceKey.parse("echo-grpc.default")


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    dest = tmp_path / "demo"
    shutil.copytree(DEMO, dest)
    return dest


def bump(path: Path, text: str) -> None:
    """Rewrite a file and move its mtime forward, so a poller sees the change even on coarse clocks."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10_000_000, before + 10_000_000))


# ---------------------------------------------------------------------------------------------------------------
# The demo clusterset


def test_demo_clusterset_definition() -> None:
    cs = load_clusterset(DEMO)
    assert cs.name == "demo" and cs.trust_domain == "demo.meshfed.local"
    assert cs.cidr == "127.241.0.0/16"
    east, west = cs.clusters
    assert (east.id, east.network, east.region, east.zone) == ("east", "net-east", "us-east", "us-east-1a")
    assert (west.id, west.network, west.region, west.zone) == ("west", "net-west", "eu-west", "eu-west-1a")
    assert cs.federation.heartbeat_interval < cs.federation.lease_ttl
    assert cs.cluster_dir("west") == DEMO / "west"
    with pytest.raises(ClusterSetError, match="members: east, west"):
        cs.cluster("south")


def test_demo_manifests_are_valid_kubernetes() -> None:
    checked = 0
    for path in sorted(DEMO.glob("*/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            try:
                kubernetes_validate.validate(doc, "1.30", strict=True)
                checked += 1
            except SchemaNotFoundError:
                # CRDs: kubernetes-validate has no schema for them
                assert doc["kind"] in ("ServiceExport", "AuthorizationPolicy", "VirtualService", "DestinationRule")
    assert checked >= 10


def test_demo_content() -> None:
    state = load_clusterset_manifests(load_clusterset(DEMO))
    assert state.problems == ()
    east, west = state.snapshots[ClusterId("east")], state.snapshots[ClusterId("west")]
    assert set(east.services) == {REVIEWS, DETAILS, DB}
    assert set(west.services) == {REVIEWS, RATINGS, DB, ECHO_GRPC}
    assert set(east.exports) == {REVIEWS, DB} and set(west.exports) == {REVIEWS, RATINGS, DB, ECHO_GRPC}
    assert all(ep.address.startswith("127.") for s in (east, west) for v in s.services.values() for ep in v.endpoints)
    imports = state.mcs.imports
    assert set(imports) == {REVIEWS, RATINGS, DB, ECHO_GRPC}  # details is local only
    assert imports[REVIEWS].clusters == ("east", "west") and imports[RATINGS].clusters == ("west",)
    assert imports[DB].type == ServiceType.HEADLESS and imports[DB].ips == ()
    assert imports[REVIEWS].ips[0].startswith("127.241.")
    assert [e.hostname for e in east.services[DB].endpoints if e.ready] == ["db-0", "db-1"]
    for (cluster, key), conds in state.mcs.conditions.items():
        assert {c.type: c.status for c in conds} == {"Valid": "True", "Ready": "True", "Conflict": "False"}, (
            cluster,
            key,
        )
    reg = state.registry("east")
    assert reg.local == "east" and set(reg.clusters) == {"east", "west"}
    assert reg.imports == imports
    (exp,) = [e for e in reg.all_exports() if e.cluster == "west" and e.key == RATINGS]
    assert exp.condition("Ready") is not None


# ---------------------------------------------------------------------------------------------------------------
# Malformed manifests


BAD_PORT = """\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: default}
spec:
  ports: [{name: http, port: "eighty"}]
"""


def test_bad_field_is_reported_and_last_good_file_stays(demo: Path) -> None:
    src = ManifestSource(demo / "east", "east")
    good = src.load()
    assert good.problems == () and REVIEWS in good.snapshot.services
    target = demo / "east" / "reviews.yaml"
    bump(target, BAD_PORT)
    bad = src.load()
    (err,) = bad.errors
    assert err.file == str(target) and err.document == 2 and err.field == "spec.ports[0].port"
    assert "Service default/other" in err.message
    assert str(err).startswith(f"{target}: document 2: spec.ports[0].port: ")
    assert any("last good version" in w.message for w in bad.warnings)
    # the whole file is rejected; what it held before stays in force, with its endpoints
    assert bad.snapshot == good.snapshot
    assert len(bad.snapshot.services[REVIEWS].endpoints) == 2


def test_yaml_syntax_error_names_document_and_line(demo: Path) -> None:
    src = ManifestSource(demo / "west", "west")
    before = src.load().snapshot
    target = demo / "west" / "ratings.yaml"
    bump(target, target.read_text() + "---\nkind: [unclosed\n")
    res = src.load()
    (err,) = res.errors
    assert err.document == 3 and "not valid YAML at line" in err.message
    assert res.snapshot == before


def test_a_file_never_good_contributes_nothing(demo: Path) -> None:
    bump(demo / "east" / "broken.yaml", BAD_PORT)
    res = ManifestSource(demo / "east", "east").load()
    assert [e.document for e in res.errors] == [2]
    assert ServiceKey.parse("other.default") not in res.snapshot.services
    assert any("nothing from this file" in w.message for w in res.warnings)
    assert REVIEWS in res.snapshot.services  # other files unaffected


def test_unknown_kinds_are_skipped_with_a_warning(demo: Path) -> None:
    bump(
        demo / "east" / "extra.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {a: b}\n---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: extra}\nspec: {ports: [{port: 80}]}\n",
    )
    res = ManifestSource(demo / "east", "east").load()
    assert res.errors == ()
    (w,) = res.warnings
    assert w.severity == WARNING and w.document == 1 and "v1/ConfigMap" in w.message
    assert ServiceKey.parse("extra.default") in res.snapshot.services


def test_extra_kinds_in_the_table_land_in_extras(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = ("example.meshfed.io/v1", "Thing")
    monkeypatch.setattr(cv, "CONVERTERS", MappingProxyType(
        {**cv.CONVERTERS, marker: lambda obj, cluster: ("thing", obj["metadata"]["name"])}))
    bump(demo / "east" / "thing.yaml", f"apiVersion: {marker[0]}\nkind: {marker[1]}\nmetadata: {{name: t1}}\n")
    res = ManifestSource(demo / "east", "east").load()
    assert ("thing", "t1") in res.snapshot.extras  # beside the demo's own policies


def test_v1_list_documents(demo: Path) -> None:
    items = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {"ports": [{"port": 0}]}},
    ]
    bump(demo / "east" / "list.yaml", yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    res = ManifestSource(demo / "east", "east").load()
    (err,) = res.errors
    assert err.field == "items[1].spec.ports[0].port"


def test_deleting_a_file_removes_its_objects(demo: Path) -> None:
    src = ManifestSource(demo / "west", "west")
    assert RATINGS in src.load().snapshot.exports
    (demo / "west" / "serviceexport-ratings-default.yaml").unlink()
    res = src.load()
    assert RATINGS not in res.snapshot.exports and RATINGS in res.snapshot.services


def test_duplicates_across_files_first_file_wins(demo: Path) -> None:
    text = (
        (demo / "east" / "details.yaml")
        .read_text()
        .replace("port: 9080\n      targetPort", "port: 9081\n      targetPort")
    )
    bump(demo / "east" / "zz-details-copy.yaml", text)
    res = ManifestSource(demo / "east", "east").load()
    assert res.snapshot.services[DETAILS].ports[0].port == 9080
    assert any("also defined in" in w.message and "details.yaml" in w.message for w in res.warnings)


def test_missing_folder_is_an_error_not_a_crash(tmp_path: Path) -> None:
    res = ManifestSource(tmp_path / "nope", "east").load()
    assert res.snapshot.services == {} and len(res.errors) == 1


def test_a_vanished_folder_keeps_the_last_good_state(demo: Path) -> None:
    src = ManifestSource(demo / "east", "east")
    good = src.load().snapshot
    (demo / "east").rename(demo / "east-moved")
    res = src.load()
    assert res.snapshot == good and "last good state" in res.errors[0].message
    (demo / "east-moved").rename(demo / "east")
    for p in (demo / "east").glob("*.yaml"):
        p.unlink()
    assert src.load().snapshot.services == {}  # an existing, empty folder: everything was really deleted


def test_hidden_and_other_files_are_ignored(demo: Path) -> None:
    (demo / "east" / ".reviews.yaml.swp").write_text("garbage: [")
    (demo / "east" / "notes.txt").write_text("garbage: [")
    assert ManifestSource(demo / "east", "east").load().problems == ()


def test_orphan_slices_warn(demo: Path) -> None:
    (demo / "east" / "details.yaml").write_text((demo / "east" / "details.yaml").read_text().split("---\n", 1)[1])
    res = ManifestSource(demo / "east", "east").load()
    assert DETAILS not in res.snapshot.services
    assert any("EndpointSlice default/details-east-1" in w.message for w in res.warnings)


# ---------------------------------------------------------------------------------------------------------------
# Watching


async def test_watch_yields_on_content_change_only(demo: Path) -> None:
    src = ManifestSource(demo / "west", "west")
    target = demo / "west" / "ratings.yaml"
    seen: list[LoadResult] = []
    step = 0
    async for res in src.watch(interval=0.01, max_polls=2000):
        seen.append(res)
        if step == 0:
            bump(target, target.read_text().replace("127.0.2.20", "127.0.2.21"))
        elif step == 1:
            bump(target, target.read_text().replace("port: 9080\n      targetPort", "port: x\n      targetPort"))
        else:
            break
        step += 1
    first, second, third = seen
    assert first.snapshot.services[RATINGS].endpoints[0].address == "127.0.2.20"
    assert second.snapshot.services[RATINGS].endpoints[0].address == "127.0.2.21"
    assert second.snapshot.version != first.snapshot.version
    # a broken edit is yielded (problems changed) with the last good snapshot still in force
    assert third.snapshot == second.snapshot
    assert third.errors and third.errors[0].field == "spec.ports[0].port"


async def test_watch_is_bounded_when_nothing_changes(demo: Path) -> None:
    results = [r async for r in ManifestSource(demo / "east", "east").watch(interval=0.001, max_polls=5)]
    assert len(results) == 1


async def test_watch_ignores_a_touch_without_content_change(demo: Path) -> None:
    src = ManifestSource(demo / "east", "east")
    target = demo / "east" / "reviews.yaml"
    results = []
    async for res in src.watch(interval=0.001, max_polls=5):
        results.append(res)
        # new mtime, same bytes: the poller reloads but has nothing new to yield
        os.utime(target, ns=(target.stat().st_mtime_ns + 50_000_000,) * 2)
    assert len(results) == 1
    assert src.last.snapshot == results[0].snapshot


# ---------------------------------------------------------------------------------------------------------------
# clusterset.yaml


def base() -> dict[str, Any]:
    return {
        "name": "demo",
        "trustDomain": "demo.meshfed.local",
        "clusters": [{"name": "east", "network": "net-east"}],
    }


def test_clusterset_defaults() -> None:
    cs = parse_clusterset(base())
    assert cs.cidr == "241.0.0.0/8"
    assert cs.federation.lease_ttl == 15.0 and cs.clusters[0].gateway_port == 15443


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Demo"}, "name"),
        ({"trustDomain": "not a domain"}, "trustDomain"),
        ({"clustersetCIDR": "241.0.0.1/8"}, "clustersetCIDR"),
        ({"clusters": []}, "clusters"),
        ({"clusters": [{"name": "East"}]}, "clusters[0].name"),
        ({"clusters": [{"name": "east"}, {"name": "east"}]}, "clusters[1]"),
        ({"clusters": [{"name": "east", "netwrk": "x"}]}, "clusters[0].netwrk"),
        ({"clusters": [{"name": "east", "gateway": {"port": 0}}]}, "clusters[0].gateway.port"),
        ({"federation": {"leaseTTLSeconds": 5, "heartbeatIntervalSeconds": 5}}, "federation.heartbeatIntervalSeconds"),
        ({"federation": {"leaseTTLSeconds": "long"}}, "federation.leaseTTLSeconds"),
        ({"extra": 1}, "extra"),
    ],
)
def test_clusterset_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    data = base() | change
    with pytest.raises(ClusterSetError) as info:
        parse_clusterset(data, file="x/clusterset.yaml")
    assert info.value.field == field
    assert str(info.value).startswith(f"x/clusterset.yaml: {field}: ")


def test_clusterset_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ClusterSetError, match="no such file"):
        load_clusterset(tmp_path)
    (tmp_path / "clusterset.yaml").write_text("name: [\n")
    with pytest.raises(ClusterSetError, match="not valid YAML"):
        load_clusterset(tmp_path)
    assert ERROR == "error"
