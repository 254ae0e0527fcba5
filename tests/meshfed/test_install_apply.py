"""``meshfed install --apply`` against two Kubernetes API server doubles (one per cluster, one kubeconfig with a
context for each), through the real ``kubernetes`` client, running the real ``meshfed`` command in a subprocess.

Covers: objects created phase by phase across clusters; readiness waits that end only when the test marks the
Deployments ready (``status.readyReplicas``); a re-run that sends no writes and says "unchanged"; drift repaired
while allocated Service fields are kept; a fixed control plane Service IP (``--dns-service-ip``) applied, and a
different live one refused by name; an injected API error stopping the run with a message naming cluster, object
and error (non-zero exit) and a re-run finishing the job; the wait's timeout; context mapping errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from meshfed.cli import cli
from tests.support.kubeapi import KubeApiDouble, ResourceInfo

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "clusters" / "demo"
NS = "meshfed-system"
MESHFED = str(Path(sys.executable).parent / "meshfed")
WRITES = ("POST", "PUT", "PATCH", "DELETE")

EXTRA_RESOURCES = (
    ResourceInfo("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, True),
    ResourceInfo("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, False),
)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("apply") / "render"
    result = CliRunner().invoke(cli, ["install", str(DEMO), "--render", str(out), "--federation-url",
                                      "https://fed.example.net:8443"])
    assert result.exit_code == 0, result.output
    return out


def _double(*, ready: bool) -> KubeApiDouble:
    api = KubeApiDouble(ready_deployments=ready)
    for info in EXTRA_RESOURCES:
        api.register_resource(info)
    return api.start()


@pytest.fixture
def clusters(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[KubeApiDouble, KubeApiDouble, Path]]:
    ready = getattr(request, "param", True)
    east, west = _double(ready=ready), _double(ready=ready)
    try:
        kubeconfig = east.write_kubeconfig(tmp_path / "kubeconfig", context="east", others={"west": west})
        yield east, west, kubeconfig
    finally:
        east.stop()
        west.stop()


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def _run(*args: str) -> Ran:
    """The command in this process (the subprocess form costs seconds of imports on a loaded machine)."""
    result = CliRunner().invoke(cli, ["install", *args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def _run_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([MESHFED, "install", *args], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False, cwd=REPO)


def _start(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.Popen([MESHFED, "install", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)


def _writes(api: KubeApiDouble) -> list[tuple[str, str]]:
    return [(m, p) for m, p in list(api.requests) if m in WRITES]


def _names(api: KubeApiDouble, api_version: str, kind: str) -> set[str]:
    return {o["metadata"]["name"] for o in api.objects(api_version, kind)}


def test_apply_creates_everything_in_order_then_rerun_changes_nothing(
    rendered: Path, clusters: tuple[KubeApiDouble, KubeApiDouble, Path]
) -> None:
    east, west, kubeconfig = clusters
    first = _run(str(rendered), "--apply", "--kubeconfig", str(kubeconfig), "-o", "json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)["apply"]
    assert report["contexts"] == {"east": "east", "west": "west"}
    assert report["counts"]["created"] == len(report["objects"]) and report["counts"]["unchanged"] == 0
    # what exists where
    assert _names(east, "apps/v1", "Deployment") == {"meshfed-federation", "meshfed-controlplane",
                                                     "meshfed-eastwest-gateway"}
    assert _names(west, "apps/v1", "Deployment") == {"meshfed-controlplane", "meshfed-eastwest-gateway"}
    for api in (east, west):
        assert _names(api, "v1", "Namespace") == {NS}
        assert _names(api, "apiextensions.k8s.io/v1", "CustomResourceDefinition") == {
            "serviceexports.multicluster.x-k8s.io", "serviceimports.multicluster.x-k8s.io",
            "clusterproperties.about.k8s.io"}
        # KEP-2149: each cluster states its id and its clusterset
        assert {o["metadata"]["name"]: o["spec"]["value"] for o in api.objects("about.k8s.io/v1alpha1",
                                                                              "ClusterProperty")} == {
            "cluster.clusterset.k8s.io": "east" if api is east else "west", "clusterset.k8s.io": "demo"}
        assert "cacerts" in _names(api, "v1", "Secret")
        assert _names(api, "rbac.authorization.k8s.io/v1", "ClusterRole") == {"meshfed-controlplane"}
    assert _names(east, "v1", "PersistentVolumeClaim") == {"meshfed-federation-data"}
    assert "meshfed-federation-ca" not in _names(west, "v1", "Secret")
    # in each cluster, creations follow the phases
    order = {"namespaces": 0, "customresourcedefinitions": 0, "serviceaccounts": 0, "clusterroles": 0,
             "clusterrolebindings": 0}
    for api in (east, west):
        posts = [p.split("?")[0] for m, p in _writes(api) if m == "POST"]
        assert all(m == "POST" for m, _ in _writes(api)), "first run only creates"
        first_secret = next(i for i, p in enumerate(posts) if p.endswith("/secrets"))
        assert all(p.rsplit("/", 1)[1] in order for p in posts[:first_secret])
        deployments = [p for p in posts if p.endswith("/deployments")]
        assert len(deployments) == (3 if api is east else 2)
    # across clusters: the JSON report lists objects in apply order, phase by phase
    objs = [(o["cluster"], o["object"]) for o in report["objects"]]
    idx = {o: i for i, o in enumerate(objs)}
    assert idx[("west", f"Secret {NS}/cacerts")] < idx[("east", f"Deployment {NS}/meshfed-federation")] \
        < idx[("west", f"Deployment {NS}/meshfed-controlplane")] \
        < idx[("east", f"Deployment {NS}/meshfed-eastwest-gateway")]
    # the stored objects carry what was rendered
    secret = east.get_object("v1", "Secret", "cacerts", NS)
    assert secret is not None and set(secret["data"]) >= {"ca-cert.pem", "ca-key.pem", "root-cert.pem",
                                                          "cert-chain.pem"}
    assert "meshfed.io/applied-hash" in secret["metadata"]["annotations"]
    assert "PRIVATE KEY" not in first.stdout + first.stderr

    # re-run: nothing written, every object unchanged
    before = (len(_writes(east)), len(_writes(west)))
    second = _run(str(rendered), "--apply", "--kubeconfig", str(kubeconfig), "-o", "json")
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)["apply"]
    assert again["counts"]["unchanged"] == len(report["objects"])
    assert again["counts"]["created"] == again["counts"]["replaced"] == 0
    assert (len(_writes(east)), len(_writes(west))) == before
    assert "unchanged" in second.stderr


def test_drift_is_repaired_and_allocated_service_fields_kept(
    rendered: Path, clusters: tuple[KubeApiDouble, KubeApiDouble, Path]
) -> None:
    east, west, kubeconfig = clusters
    assert _run(str(rendered), "--apply", "--kubeconfig", str(kubeconfig)).returncode == 0
    # someone edits the clusterset ConfigMap by hand (keeping our annotation) ...
    cm = west.get_object("v1", "ConfigMap", "meshfed-clusterset", NS)
    assert cm is not None
    cm["data"]["clusterset.yaml"] = "edited: by hand\n"
    west.put_object(cm)
    # ... and the API server allocated addresses to the gateway Service, which a re-render changes
    svc = east.get_object("v1", "Service", "meshfed-eastwest-gateway", NS)
    assert svc is not None
    svc["spec"]["clusterIP"] = "10.96.0.15"
    svc["spec"]["clusterIPs"] = ["10.96.0.15"]
    svc["spec"]["ports"][0]["nodePort"] = 31443
    svc["metadata"]["annotations"]["meshfed.io/applied-hash"] = "stale"
    east.put_object(svc)
    result = _run(str(rendered), "--apply", "--kubeconfig", str(kubeconfig), "-o", "json")
    assert result.returncode == 0, result.stderr
    changed = {(o["cluster"], o["object"]) for o in json.loads(result.stdout)["apply"]["objects"]
               if o["action"] != "unchanged"}
    assert changed == {("west", f"ConfigMap {NS}/meshfed-clusterset"),
                       ("east", f"Service {NS}/meshfed-eastwest-gateway")}
    cm = west.get_object("v1", "ConfigMap", "meshfed-clusterset", NS)
    assert cm is not None and cm["data"]["clusterset.yaml"] == (DEMO / "clusterset.yaml").read_text()
    svc = east.get_object("v1", "Service", "meshfed-eastwest-gateway", NS)
    assert svc is not None
    assert svc["spec"]["clusterIP"] == "10.96.0.15" and svc["spec"]["ports"][0]["nodePort"] == 31443
    assert svc["metadata"]["annotations"]["meshfed.io/applied-hash"] != "stale"


def test_a_fixed_dns_service_ip_is_applied_and_a_different_live_one_is_named(
    rendered: Path, clusters: tuple[KubeApiDouble, KubeApiDouble, Path], tmp_path: Path
) -> None:
    east, west, kubeconfig = clusters
    out = tmp_path / "dns"
    made = CliRunner().invoke(cli, ["install", str(DEMO), "--render", str(out), "--root", str(rendered / "ca"),
                                    "--federation-url", "https://fed.example.net:8443",
                                    "--dns-service-ip", "east=10.96.0.53"])
    assert made.exit_code == 0, made.output
    assert _run(str(out), "--apply", "--kubeconfig", str(kubeconfig)).returncode == 0
    svc = east.get_object("v1", "Service", "meshfed-controlplane", NS)
    assert svc is not None and svc["spec"]["clusterIP"] == "10.96.0.53"
    # west's Service got another address from the API server; asking for a fixed one there is refused by name
    live = west.get_object("v1", "Service", "meshfed-controlplane", NS)
    assert live is not None
    live["spec"]["clusterIP"], live["spec"]["clusterIPs"] = "10.100.0.7", ["10.100.0.7"]
    west.put_object(live)
    made = CliRunner().invoke(cli, ["install", str(DEMO), "--render", str(out), "--root", str(rendered / "ca"),
                                    "--federation-url", "https://fed.example.net:8443",
                                    "--dns-service-ip", "east=10.96.0.53", "--dns-service-ip", "west=10.100.0.53"])
    assert made.exit_code == 0, made.output
    failed = _run(str(out), "--apply", "--kubeconfig", str(kubeconfig), "--no-wait")
    assert failed.returncode != 0
    assert f"cluster west: replacing Service {NS}/meshfed-controlplane: it has cluster IP 10.100.0.7" in \
        " ".join(failed.stderr.split())
    assert "--dns-service-ip west=10.100.0.7" in failed.stderr


def _mark_ready(api: KubeApiDouble, name: str) -> None:
    obj = api.get_object("apps/v1", "Deployment", name, NS)
    assert obj is not None
    n = obj["spec"].get("replicas", 1)
    obj["status"] = {"observedGeneration": obj["metadata"]["generation"], "replicas": n, "updatedReplicas": n,
                     "readyReplicas": n, "availableReplicas": n}
    api.put_object(obj)


def _wait_until(what: str, cond: Any, proc: subprocess.Popen[str], deadline: float) -> None:
    while not cond():
        if proc.poll() is not None:
            _out, err = proc.communicate()
            pytest.fail(f"install exited ({proc.returncode}) while waiting for {what}: {err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("clusters", [False], indirect=True)
def test_waits_for_readiness_phase_by_phase(
    rendered: Path, clusters: tuple[KubeApiDouble, KubeApiDouble, Path]
) -> None:
    east, west, kubeconfig = clusters
    proc = _start(str(rendered), "--apply", "--kubeconfig", str(kubeconfig), "--timeout", "60",
                  "--poll-interval", "0.2")
    deadline = time.monotonic() + 60
    try:
        def has(api: KubeApiDouble, name: str) -> bool:
            return api.get_object("apps/v1", "Deployment", name, NS) is not None

        _wait_until("the federation Deployment", lambda: has(east, "meshfed-federation"), proc, deadline)
        # the CA went everywhere first; nothing of the next phase exists while the federation is not ready
        assert west.get_object("v1", "Secret", "cacerts", NS) is not None
        _wait_until("a readiness poll", lambda: sum(
            1 for m, p in list(east.requests) if m == "GET" and p.endswith("/deployments/meshfed-federation")) >= 3,
            proc, deadline)
        assert proc.poll() is None
        assert not has(east, "meshfed-controlplane") and not has(west, "meshfed-controlplane")
        _mark_ready(east, "meshfed-federation")

        _wait_until("both control planes", lambda: has(east, "meshfed-controlplane") and has(west,
                    "meshfed-controlplane"), proc, deadline)
        _wait_until("a readiness poll", lambda: sum(
            1 for m, p in list(west.requests) if m == "GET" and p.endswith("/deployments/meshfed-controlplane")) >= 2,
            proc, deadline)
        assert not has(east, "meshfed-eastwest-gateway") and not has(west, "meshfed-eastwest-gateway")
        _mark_ready(east, "meshfed-controlplane")
        _wait_until("a readiness poll of west", lambda: sum(
            1 for m, p in list(west.requests) if m == "GET" and p.endswith("/deployments/meshfed-controlplane")) >= 4,
            proc, deadline)
        # one of two control planes ready is not enough
        assert not has(east, "meshfed-eastwest-gateway")
        _mark_ready(west, "meshfed-controlplane")

        _wait_until("both gateways", lambda: has(east, "meshfed-eastwest-gateway") and has(
            west, "meshfed-eastwest-gateway"), proc, deadline)
        assert proc.poll() is None
        _mark_ready(east, "meshfed-eastwest-gateway")
        _mark_ready(west, "meshfed-eastwest-gateway")
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "waiting" in err and "0/1 ready" in err
        assert f"ready     Deployment {NS}/meshfed-federation" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("clusters", [False], indirect=True)
def test_readiness_timeout_names_the_deployment(
    rendered: Path, clusters: tuple[KubeApiDouble, KubeApiDouble, Path]
) -> None:
    _east, west, kubeconfig = clusters
    result = _run(str(rendered), "--apply", "--kubeconfig", str(kubeconfig), "--timeout", "1")
    assert result.returncode != 0
    assert "cluster east: waiting for Deployment meshfed-system/meshfed-federation: not ready after 1s (0/1 ready" \
        in " ".join(result.stderr.split())
    assert west.get_object("apps/v1", "Deployment", "meshfed-controlplane", NS) is None


def test_api_error_stops_with_a_clear_message_and_rerun_completes(
    rendered: Path, clusters: tuple[KubeApiDouble, KubeApiDouble, Path]
) -> None:
    east, west, kubeconfig = clusters
    west.inject_error(1, code=500, path_prefix=f"/apis/apps/v1/namespaces/{NS}/deployments", method="POST")
    failed = _run_process(str(rendered), "--apply", "--kubeconfig", str(kubeconfig))
    assert failed.returncode != 0
    message = " ".join(failed.stderr.split())
    assert ("error: cluster west: creating Deployment meshfed-system/meshfed-controlplane: 500 InternalError: "
            "injected failure 500") in message
    assert "run the same command again" in message
    # it stopped there: east's control plane (same phase, earlier) exists, no gateway anywhere
    assert east.get_object("apps/v1", "Deployment", "meshfed-controlplane", NS) is not None
    assert west.get_object("apps/v1", "Deployment", "meshfed-controlplane", NS) is None
    for api in (east, west):
        assert api.get_object("apps/v1", "Deployment", "meshfed-eastwest-gateway", NS) is None
    # safe to re-run: what exists is unchanged, the rest is created
    again = _run(str(rendered), "--apply", "--kubeconfig", str(kubeconfig), "-o", "json")
    assert again.returncode == 0, again.stderr
    actions = {(o["cluster"], o["object"]): o["action"] for o in json.loads(again.stdout)["apply"]["objects"]}
    assert actions[("east", f"Namespace {NS}")] == "unchanged"
    assert actions[("west", f"Deployment {NS}/meshfed-controlplane")] == "created"
    assert actions[("west", f"Deployment {NS}/meshfed-eastwest-gateway")] == "created"


def test_context_mapping(rendered: Path, tmp_path: Path) -> None:
    with KubeApiDouble() as east, KubeApiDouble() as west:
        for api in (east, west):
            for info in EXTRA_RESOURCES:
                api.register_resource(info)
        kubeconfig = east.write_kubeconfig(tmp_path / "kc", context="kind-east", others={"prod-west": west})
        runner = CliRunner()
        missing = runner.invoke(cli, ["install", str(rendered), "--apply", "--kubeconfig", str(kubeconfig)])
        assert missing.exit_code != 0
        text = " ".join(missing.output.split())
        assert "no context for: east -> east, west -> west" in text and "kind-east, prod-west" in text
        bad = runner.invoke(cli, ["install", str(rendered), "--apply", "--kubeconfig", str(kubeconfig),
                                  "--context", "north=x"])
        assert bad.exit_code != 0 and "no cluster 'north'" in bad.output
        only_east = runner.invoke(cli, ["install", str(rendered), "--apply", "--kubeconfig", str(kubeconfig),
                                        "--context-prefix", "kind-", "--cluster", "east", "-o", "json"])
        assert only_east.exit_code == 0, only_east.output
        assert east.get_object("apps/v1", "Deployment", "meshfed-eastwest-gateway", NS) is not None
        assert not west.objects("v1", "Namespace")
        mapped = runner.invoke(cli, ["install", str(rendered), "--apply", "--kubeconfig", str(kubeconfig),
                                     "--context-prefix", "kind-", "--context", "west=prod-west", "-o", "json"])
        assert mapped.exit_code == 0, mapped.output
        report = json.loads(mapped.stdout[mapped.stdout.index("{"):])["apply"]
        assert report["contexts"] == {"east": "kind-east", "west": "prod-west"}
        assert west.get_object("apps/v1", "Deployment", "meshfed-eastwest-gateway", NS) is not None
        assert {o["action"] for o in report["objects"] if o["cluster"] == "east"} == {"unchanged"}


def test_render_and_apply_in_one_command(clusters: tuple[KubeApiDouble, KubeApiDouble, Path], tmp_path: Path) -> None:
    _east, west, kubeconfig = clusters
    result = _run(str(DEMO), "--render", str(tmp_path / "out"), "--apply", "--kubeconfig", str(kubeconfig))
    assert result.returncode == 0, result.stderr
    assert "rendered" in result.stderr and "applied to east, west" in result.stderr
    assert west.get_object("apps/v1", "Deployment", "meshfed-eastwest-gateway", NS) is not None
    nothing = _run(str(tmp_path / "out"))
    assert nothing.returncode != 0 and "--apply" in nothing.stderr


def test_readiness_and_drift_rules() -> None:
    from meshfed.install.apply import HASH_ANNOTATION, drifted, with_hash, workload_ready

    dep = {"metadata": {"generation": 2}, "spec": {"replicas": 2}}
    assert workload_ready(dep) == (False, "0/2 ready")
    dep["status"] = {"observedGeneration": 1, "readyReplicas": 2, "updatedReplicas": 2}
    assert workload_ready(dep)[0] is False and "generation 2 not observed" in workload_ready(dep)[1]
    dep["status"] = {"observedGeneration": 2, "readyReplicas": 2, "updatedReplicas": 1}
    assert workload_ready(dep)[0] is False
    dep["status"]["updatedReplicas"] = 2
    assert workload_ready(dep) == (True, "2/2 ready")

    desired = with_hash({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "labels": {"a": "1"}},
                         "data": {"k": "v"}})
    assert desired["metadata"]["annotations"][HASH_ANNOTATION] == with_hash(desired)["metadata"]["annotations"][
        HASH_ANNOTATION], "the hash ignores its own annotation"
    live = json.loads(json.dumps(desired))
    live["metadata"].update({"uid": "u", "resourceVersion": "7", "labels": {"a": "1", "added": "by-someone"}})
    live["data"]["extra"] = "server default"
    assert not drifted(desired, live)
    live["data"]["k"] = "edited"
    assert drifted(desired, live)
    pods = {"kind": "Deployment", "spec": {"template": {"spec": {"containers": [{"name": "a", "args": ["x"]}]}}}}
    live_pods = json.loads(json.dumps(pods))
    live_pods["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    assert not drifted(pods, live_pods)
    live_pods["spec"]["template"]["spec"]["containers"].append({"name": "injected"})
    assert drifted(pods, live_pods)
