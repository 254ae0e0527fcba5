"""``meshfed inject -f``: every workload kind, Lists and multi-document YAML, stdin, -o json; the output passes
kubernetes-validate strict; a second run over the output changes nothing; errors name the document and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from meshfed.cli import cli

K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
APP = {"containers": [{"name": "app", "image": "reviews:1", "ports": [{"name": "http", "containerPort": 9080}]}]}
TEMPLATE = {"metadata": {"labels": {"app": "reviews"}}, "spec": APP}
SELECTOR = {"matchLabels": {"app": "reviews"}}


def workloads() -> list[dict[str, Any]]:
    meta = {"name": "reviews", "namespace": "default"}
    job_template = {"metadata": {}, "spec": {**APP, "restartPolicy": "Never"}}
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": APP},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
         "spec": {"selector": SELECTOR, "template": TEMPLATE}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta,
         "spec": {"selector": SELECTOR, "serviceName": "reviews", "template": TEMPLATE}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta,
         "spec": {"selector": SELECTOR, "template": TEMPLATE}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {"template": job_template}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta,
         "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": job_template}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta,
         "spec": {"selector": {"app": "reviews"}, "ports": [{"port": 9080}]}},
    ]


def run(*args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(cli, ["inject", "--cluster", "east", *args], input=stdin)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj["kind"]
    if kind == "Pod":
        return obj["spec"]  # type: ignore[no-any-return]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    if kind == "Service":
        return None
    return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_every_kind_in_multidoc_yaml_is_injected_and_valid(tmp_path: Path) -> None:
    f = tmp_path / "in.yaml"
    f.write_text(yaml.safe_dump_all(workloads()))
    result = run("-f", str(f))
    assert result.exit_code == 0, result.output
    out = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in out] == [w["kind"] for w in workloads()]
    for obj in out:
        spec = pod_spec(obj)
        if spec is None:
            assert obj == workloads()[-1]
            continue
        assert [c["name"] for c in spec["initContainers"]] == ["meshfed-init", "meshfed-proxy"]
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    assert "document 2 (Deployment default/reviews): injected" in result.stderr


def test_a_second_run_over_the_output_changes_nothing(tmp_path: Path) -> None:
    f = tmp_path / "in.yaml"
    f.write_text(yaml.safe_dump_all(workloads()[:2]))
    first = run("-f", str(f))
    second = run("-f", "-", stdin=first.stdout)
    assert second.exit_code == 0, second.output
    assert list(yaml.safe_load_all(second.stdout)) == list(yaml.safe_load_all(first.stdout))
    assert "already injected" in second.stderr


def test_list_from_stdin_as_json() -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": workloads()[:2]}
    result = run("-f", "-", "-o", "json", stdin=json.dumps(doc))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["kind"] == "List" and len(out["items"]) == 2
    assert out["items"][1]["spec"]["template"]["spec"]["initContainers"][1]["restartPolicy"] == "Always"
    for item in out["items"]:
        kubernetes_validate.validate(item, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize(("doc", "message"), [
    ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"},
      "spec": {"selector": SELECTOR, "template": {"metadata": {}, "spec": {**APP, "hostNetwork": True}}}},
     "in.yaml: document 2 (Deployment shop/web): spec.template.spec.hostNetwork: "),
    ({"apiVersion": "v1", "kind": "List", "items": [workloads()[0], {"kind": "Pod", "metadata": {"name": "x"},
                                                                       "spec": {"containers": []}}]},
     "in.yaml: document 2 (List ?): items[1].spec.containers: "),
    ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {}},
     "in.yaml: document 2 (Deployment web): spec.template: is missing"),
])
def test_errors_name_the_document_and_field(tmp_path: Path, doc: dict[str, Any], message: str) -> None:
    f = tmp_path / "in.yaml"
    f.write_text(yaml.safe_dump_all([workloads()[0], doc]))
    result = run("-f", str(f))
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()), result.output
    assert result.stdout.count("kind: Pod") == 0, "nothing printed when a document fails"


def test_a_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    missing = run("-f", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2 and "nope.yaml" in missing.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Pod\n  spec: [\n")
    result = run("-f", str(bad))
    assert result.exit_code != 0 and "bad.yaml: not YAML or JSON" in result.output


def test_meshfeds_own_rendered_manifests_pass_through_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "render"
    demo = Path(__file__).resolve().parents[2] / "clusters" / "demo"
    rendered = CliRunner().invoke(cli, ["install", str(demo), "--render", str(out)], catch_exceptions=False)
    assert rendered.exit_code == 0, rendered.output
    manifest = out / "east" / "06-controlplane.yaml"
    result = run("-f", str(manifest))
    assert result.exit_code == 0, result.output
    assert list(yaml.safe_load_all(result.stdout)) == list(yaml.safe_load_all(manifest.read_text()))
    assert "one of meshfed's own pods" in result.stderr
