"""``meshfed export`` / ``meshfed unexport``: on a local clusterset folder (ServiceExport manifest files) and,
with ``--context``, against the Kubernetes API test double (tests/support/kubeapi.py) through the real client."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from discovery.clusterset import load_clusterset
from discovery.manifests import ManifestSource, load_clusterset_manifests
from discovery.model import ServiceKey
from meshfed.cli import cli
from meshfed.cmd_export import export_local
from tests.support.kubeapi import KubeApiDouble

DETAILS = ServiceKey.parse("details.default")
REVIEWS = ServiceKey.parse("reviews.default")


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_export_writes_a_manifest_the_source_reads(demo: Path) -> None:
    res = run("export", "details", "-n", "default", "--cluster", "east", "--clusterset", str(demo))
    assert res.exit_code == 0, res.output
    path = demo / "east" / "serviceexport-details-default.yaml"
    assert "exported details.default from cluster east" in res.stdout and str(path) in res.stdout
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert doc["apiVersion"] == "multicluster.x-k8s.io/v1beta1" and doc["kind"] == "ServiceExport"
    assert doc["metadata"]["name"] == "details" and doc["metadata"]["namespace"] == "default"
    assert doc["metadata"]["creationTimestamp"].endswith("Z")
    snap = ManifestSource(demo / "east", "east").load().snapshot
    assert DETAILS in snap.exports
    state = load_clusterset_manifests(load_clusterset(demo))
    assert state.mcs.imports[DETAILS].clusters == ("east",)


def test_export_is_idempotent(demo: Path) -> None:
    path = demo / "west" / "serviceexport-ratings-default.yaml"
    before = path.read_text()
    res = run("export", "ratings", "--cluster", "west", "--clusterset", str(demo))
    assert res.exit_code == 0
    assert "already exported" in res.stdout and "2026-01-03T00:00:00Z" in res.stdout
    assert path.read_text() == before


def test_export_refuses_a_missing_service_unless_forced(demo: Path) -> None:
    res = run("export", "ratings", "--cluster", "east", "--clusterset", str(demo))
    assert res.exit_code == 1
    assert "Service default/ratings does not exist in cluster east's manifests" in res.stderr
    assert "--force" in res.stderr
    assert not (demo / "east" / "serviceexport-ratings-default.yaml").exists()
    forced = run("export", "ratings", "--cluster", "east", "--clusterset", str(demo), "--force")
    assert forced.exit_code == 0
    state = load_clusterset_manifests(load_clusterset(demo))
    valid = next(c for c in state.mcs.conditions[("east", ServiceKey.parse("ratings.default"))] if c.type == "Valid")
    assert (valid.status, valid.reason) == ("False", "NoService")


def test_export_names_unknown_clusters_and_bad_names(demo: Path) -> None:
    res = run("export", "details", "--cluster", "south", "--clusterset", str(demo))
    assert res.exit_code == 1 and "no cluster 'south'" in res.stderr and "east, west" in res.stderr
    res = run("export", "Details", "--cluster", "east", "--clusterset", str(demo))
    assert res.exit_code == 1 and "RFC 1123" in res.stderr
    res = run("export", "details", "--clusterset", str(demo))
    assert res.exit_code == 1 and "--cluster is required" in res.stderr
    res = run("export", "details", "--cluster", "east", "--clusterset", str(demo / "nowhere"))
    assert res.exit_code == 1 and "clusterset.yaml" in res.stderr


def test_json_output(demo: Path) -> None:
    res = run("export", "details", "--cluster", "east", "--clusterset", str(demo), "-o", "json")
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["action"] == "exported" and data["cluster"] == "east" and data["service"] == "details"
    assert data["target"].endswith("serviceexport-details-default.yaml")


def test_export_timestamp_is_whole_seconds_utc(demo: Path) -> None:
    out = export_local(
        clusterset=demo, cluster="east", service="details", ns="default", now=datetime(2026, 2, 3, 4, 5, 6, 789, UTC)
    )
    assert out.created == "2026-02-03T04:05:06Z"
    snap = ManifestSource(demo / "east", "east").load().snapshot
    assert snap.exports[DETAILS].created == datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)


def test_unexport_removes_the_file(demo: Path) -> None:
    path = demo / "west" / "serviceexport-ratings-default.yaml"
    res = run("unexport", "ratings", "-n", "default", "--cluster", "west", "--clusterset", str(demo))
    assert res.exit_code == 0 and "unexported ratings.default" in res.stdout
    assert not path.exists()
    assert ServiceKey.parse("ratings.default") not in ManifestSource(demo / "west", "west").load().snapshot.exports
    again = run("unexport", "ratings", "--cluster", "west", "--clusterset", str(demo))
    assert again.exit_code == 1 and "is not exported from cluster west" in again.stderr
    ok = run("unexport", "ratings", "--cluster", "west", "--clusterset", str(demo), "--ignore-not-found")
    assert ok.exit_code == 0 and "was not exported" in ok.stdout


def test_unexport_edits_a_multi_document_file(demo: Path) -> None:
    # Move reviews' export into reviews.yaml, between the Service and the EndpointSlice.
    (demo / "east" / "serviceexport-reviews-default.yaml").unlink()
    path = demo / "east" / "reviews.yaml"
    original = path.read_text()
    service_part, slice_part = original.split("---\n", 1)
    export_doc = (
        "# exported by hand\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\n"
        "metadata: {name: reviews, namespace: default, creationTimestamp: '2026-01-01T00:00:00Z'}\n"
    )
    path.write_text(service_part + "---\n" + export_doc + "---\n" + slice_part)
    assert REVIEWS in ManifestSource(demo / "east", "east").load().snapshot.exports
    res = run("unexport", "reviews", "--cluster", "east", "--clusterset", str(demo))
    assert res.exit_code == 0 and "edited" in res.stdout
    assert path.read_text() == original  # the other documents, comments included, byte for byte
    snap = ManifestSource(demo / "east", "east").load().snapshot
    assert REVIEWS not in snap.exports and len(snap.services[REVIEWS].endpoints) == 2


def test_entry_point_runs(demo: Path) -> None:
    exe = Path(sys.executable).parent / "meshfed"
    proc = subprocess.run(
        [str(exe), "export", "details", "--cluster", "east", "--clusterset", str(demo), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["action"] == "exported"


# ---------------------------------------------------------------------------------------------------------------
# --context: the real kubernetes client against the API double


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[KubeApiDouble, Path]]:
    with KubeApiDouble() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", context="east")
        yield api, kubeconfig


def test_context_export_and_unexport(kube: tuple[KubeApiDouble, Path]) -> None:
    api, kubeconfig = kube
    ctx = ["--context", "east", "--kubeconfig", str(kubeconfig)]
    missing = run("export", "details", "-n", "default", *ctx)
    assert missing.exit_code == 1 and "does not exist in context east" in missing.stderr
    assert api.objects("multicluster.x-k8s.io/v1alpha1", "ServiceExport") == []

    api.put_object(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "details", "namespace": "default"},
            "spec": {"ports": [{"name": "http", "port": 9080}]},
        }
    )
    res = run("export", "details", "-n", "default", *ctx, "-o", "json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["action"] == "exported" and data["created"]
    obj = api.get_object("multicluster.x-k8s.io/v1alpha1", "ServiceExport", "details", "default")
    assert obj is not None and obj["metadata"]["creationTimestamp"] == data["created"]

    again = run("export", "details", "-n", "default", *ctx, "-o", "json")
    assert again.exit_code == 0 and json.loads(again.stdout)["action"] == "already-exported"

    gone = run("unexport", "details", "-n", "default", *ctx)
    assert gone.exit_code == 0 and "unexported details.default" in gone.stdout
    assert api.get_object("multicluster.x-k8s.io/v1alpha1", "ServiceExport", "details", "default") is None
    twice = run("unexport", "details", "-n", "default", *ctx)
    assert twice.exit_code == 1 and "is not exported in context east" in twice.stderr


def test_context_force_exports_ahead_of_the_service(kube: tuple[KubeApiDouble, Path]) -> None:
    api, kubeconfig = kube
    res = run("export", "later", "--context", "east", "--kubeconfig", str(kubeconfig), "--force")
    assert res.exit_code == 0, res.stderr
    assert api.get_object("multicluster.x-k8s.io/v1alpha1", "ServiceExport", "later", "default") is not None


def test_unknown_context_is_a_clear_error(kube: tuple[KubeApiDouble, Path]) -> None:
    _, kubeconfig = kube
    res = run("export", "details", "--context", "nope", "--kubeconfig", str(kubeconfig))
    assert res.exit_code == 1 and "cannot use kubeconfig context 'nope'" in res.stderr


def test_export_accepts_svc_ns_as_diagnose_and_the_docs_write_it(demo: Path) -> None:
    """Issue 18 walk item 1: 'meshfed export details.default --cluster east' as docs/troubleshooting.md has it."""
    res = run("export", "details.default", "--cluster", "east", "--clusterset", str(demo))
    assert res.exit_code == 0, res.output
    assert "exported details.default from cluster east" in res.stdout
    assert (demo / "east" / "serviceexport-details-default.yaml").exists()
    res = run("unexport", "details.default.svc.clusterset.local", "--cluster", "east", "--clusterset", str(demo))
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["export", "details.default", "-n", "other", "--cluster", "east",
                                   "--clusterset", str(demo)])
    assert res.exit_code != 0 and "names namespace 'default' but -n says 'other'" in res.output
