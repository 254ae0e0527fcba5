"""The injection webhook as the API server talks to it: ``meshfed install --render`` gives the
MutatingWebhookConfiguration and the cluster's CA Secret; a control plane started on that CA with the rendered
``--webhook-*`` flags serves ``/inject`` over HTTPS; a client trusting only the rendered ``caBundle`` and checking
the Service's DNS name sends AdmissionReview v1 requests; the JSONPatch it gets back is applied with ``jsonpatch``
and the pod validated strict. Plus the pure ``review`` rules: malformed reviews are 400s naming what is wrong."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from discovery.clusterset import load_clusterset
from discovery.model import cluster_id
from meshfed.cli import cli
from meshfed.controlplane import ControlPlane, ControlPlaneConfig, Listen
from meshfed.controlplane.webhook import review
from meshfed.inject import InjectConfig

DEMO = Path(__file__).resolve().parents[2] / "clusters" / "demo"
CONFIG = InjectConfig(cluster="east", image="registry.example/meshfed:test",
                      xds_address="meshfed-controlplane.meshfed-system.svc.cluster.local:15010")
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def pod(**annotations: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"generateName": "reviews-", "labels": {"app": "reviews"}}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "app", "image": "reviews:1",
                                     "ports": [{"name": "http", "containerPort": 9080}]}]}}


def admission(obj: Any, *, uid: str = "u-1", kind: dict[str, str] | None = None,
              operation: str = "CREATE") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": kind or {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "default",
        "operation": operation, "object": obj}}


def answer(doc: Any) -> tuple[int, dict[str, Any]]:
    return review(json.dumps(doc).encode(), CONFIG)


def test_a_pod_gets_a_patch_that_jsonpatch_applies_into_a_valid_pod() -> None:
    status, out = answer(admission(pod()))
    assert status == 200
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    resp = out["response"]
    assert resp["uid"] == "u-1" and resp["allowed"] is True and resp["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(pod(), json.loads(base64.b64decode(resp["patch"])))
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["meshfed-init", "meshfed-proxy"]
    patched["metadata"]["name"] = "reviews-x"  # the API server fills it from generateName
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(patched, version, strict=True)
    # Reinvocation (reinvocationPolicy IfNeeded) and re-injection: allowed, nothing to patch.
    status, again = answer(admission(patched, uid="u-2"))
    assert status == 200 and again["response"] == {"uid": "u-2", "allowed": True}


def test_opt_out_is_allowed_without_a_patch() -> None:
    status, out = answer(admission(pod(**{"meshfed.io/inject": "false"})))
    assert status == 200 and out["response"] == {"uid": "u-1", "allowed": True}


def test_a_pod_that_cannot_be_injected_is_denied_naming_the_field() -> None:
    obj = pod()
    obj["spec"]["hostNetwork"] = True
    status, out = answer(admission(obj))
    assert status == 200
    resp = out["response"]
    assert resp["allowed"] is False and "patch" not in resp
    assert resp["status"]["code"] == 403
    assert resp["status"]["message"].startswith("meshfed sidecar injection: spec.hostNetwork: ")


def test_not_a_v1_pod_is_refused_and_other_operations_pass() -> None:
    status, out = answer(admission({"kind": "Deployment"}, kind={"group": "apps", "version": "v1",
                                                                 "kind": "Deployment"}))
    assert status == 200 and out["response"]["allowed"] is False
    assert "v1 Pods only, not apps/v1 Deployment" in out["response"]["status"]["message"]
    status, out = answer(admission(pod(), kind={"group": "", "version": "v2", "kind": "Pod"}))
    assert out["response"]["allowed"] is False and "not v2 Pod" in out["response"]["status"]["message"]
    status, out = answer(admission(pod(), operation="UPDATE"))
    assert status == 200 and out["response"] == {"uid": "u-1", "allowed": True}


@pytest.mark.parametrize(("body", "names"), [
    (b"{not json", "the body is not JSON"),
    (b"[]", "the body: expected an object"),
    (json.dumps({**admission(pod()), "apiVersion": "admission.k8s.io/v1beta1"}).encode(), "apiVersion"),
    (json.dumps({**admission(pod()), "kind": "Pod"}).encode(), "kind: expected 'AdmissionReview'"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(), "request: expected"),
    (json.dumps(admission(pod(), uid="")).encode(), "request.uid"),
    (json.dumps({**admission(pod()), "request": {**admission(pod())["request"], "object": None}}).encode(),
     "request.object"),
    (json.dumps({**admission(pod()), "request": {**admission(pod())["request"], "kind": "Pod"}}).encode(),
     "request.kind"),
])
def test_a_malformed_review_is_a_400_naming_what_is_wrong(body: bytes, names: str) -> None:
    status, out = review(body, CONFIG)
    assert status == 400
    assert out["error"].startswith("not an AdmissionReview admission.k8s.io/v1: ")
    assert names in out["error"]


def test_a_malformed_pod_inside_a_good_review_is_a_denial_not_a_crash() -> None:
    obj = pod()
    obj["spec"]["containers"][0]["ports"] = "9080"
    status, out = answer(admission(obj))
    assert status == 200 and out["response"]["allowed"] is False
    assert "spec.containers[0].ports: must be a list" in out["response"]["status"]["message"]


# --------------------------------------------------------------------------------------------- over HTTPS


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("render") / "out"
    result = CliRunner().invoke(cli, ["install", str(DEMO), "--render", str(out), "--image",
                                      "registry.example/meshfed:test"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _ca_dir_from_secret(secret: dict[str, Any], target: Path) -> Path:
    target.mkdir(mode=0o700)
    for name, value in secret["data"].items():
        path = target / name
        path.write_bytes(base64.b64decode(value))
        path.chmod(0o600)
    return target


async def test_webhook_over_https_verified_with_the_rendered_ca_bundle(rendered: Path, tmp_path: Path) -> None:
    docs = _docs(rendered / "east" / "06-controlplane.yaml")
    webhook = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")["webhooks"][0]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    flags: dict[str, list[str]] = {}
    for flag, value in zip(args[1::2], args[2::2], strict=False):
        flags.setdefault(flag, []).append(value)
    ca_dir = _ca_dir_from_secret(_docs(rendered / "east" / "03-cacerts.yaml")[0], tmp_path / "cacerts")
    svc = webhook["clientConfig"]["service"]
    dns_name = f"{svc['name']}.{svc['namespace']}.svc"  # the name the API server dials and checks
    assert dns_name in flags["--webhook-host"]

    config = ControlPlaneConfig(
        clusterset=load_clusterset(DEMO), cluster=cluster_id("east"), ca_dir=ca_dir, federation_urls=(),
        xds=Listen("127.0.0.1", 0), dns=Listen("127.0.0.1", 0), admin=Listen("127.0.0.1", 0),
        gateway_host="127.0.0.1", gateway_port=15443, tokens_file=tmp_path / "tokens.json",
        webhook=Listen("127.0.0.1", 0), webhook_hosts=tuple(flags["--webhook-host"]),
        inject_image=flags["--inject-image"][0], inject_xds_address=flags["--inject-xds-address"][0])
    trusted = ssl.create_default_context(cadata=base64.b64decode(webhook["clientConfig"]["caBundle"]).decode())
    async with ControlPlane(config) as cp, aiohttp.ClientSession() as session:
        url = f"https://127.0.0.1:{cp.webhook_port}{svc['path']}"
        async with session.post(url, json=admission(pod()), ssl=trusted, server_hostname=dns_name) as resp:
            assert resp.status == 200
            out = await resp.json()
        patched = jsonpatch.apply_patch(pod(), json.loads(base64.b64decode(out["response"]["patch"])))
        proxy = patched["spec"]["initContainers"][1]
        env = {e["name"]: e.get("value") for e in proxy["env"]}
        assert proxy["image"] == "registry.example/meshfed:test"
        assert env["MESHFED_XDS_ADDRESS"] == flags["--inject-xds-address"][0]
        assert env["MESHFED_CLUSTER"] == "east"
        patched["metadata"]["name"] = "reviews-x"
        kubernetes_validate.validate(patched, K8S_VERSIONS[-1], strict=True)

        async with session.post(url, data=b"{", ssl=trusted, server_hostname=dns_name) as resp:
            assert resp.status == 400 and "not JSON" in (await resp.json())["error"]
        # The certificate is for the Service's names only, and chains to this cluster's root only.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.post(url, json=admission(pod()), ssl=trusted, server_hostname="evil.example"):
                pass
        west = _ca_dir_from_secret(_docs(rendered / "west" / "03-cacerts.yaml")[0], tmp_path / "west")
        other = ssl.create_default_context(cafile=str(west / "ca-cert.pem"))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.post(url, json=admission(pod()), ssl=other, server_hostname=dns_name):
                pass
