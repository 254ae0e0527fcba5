"""The pure injector (``meshfed.inject``): one test per rule; the patch is applied with ``jsonpatch`` (independent
code) and must give exactly the pod the injector printed, which must pass kubernetes-validate strict."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest

from meshfed.inject import (
    GRPC_BOOTSTRAP,
    INIT_NAME,
    PROXY_NAME,
    STATUS,
    TEMPLATES,
    InjectConfig,
    Injected,
    InjectError,
    Skipped,
    inject,
    inject_object,
)

CONFIG = InjectConfig(cluster="east", image="ghcr.io/meshfed/meshfed:0.1.0",
                      xds_address="meshfed-controlplane.meshfed-system.svc:15010")
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def pod(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "reviews", "namespace": "default", "labels": {"app": "reviews"}},
        "spec": {"containers": [{"name": "app", "image": "reviews:1",
                                 "ports": [{"name": "http", "containerPort": 9080}]}]},
    }
    base["spec"].update(spec)
    return base


def injected(obj: dict[str, Any], **kw: Any) -> Injected:
    out = inject(obj, CONFIG, **kw)
    assert isinstance(out, Injected), out
    return out


def init_containers(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in obj["spec"]["initContainers"]}


def test_patch_applied_by_jsonpatch_gives_the_printed_pod_which_validates() -> None:
    original = pod()
    before = copy.deepcopy(original)
    out = injected(original)
    assert original == before, "the input must not be changed"
    patched = jsonpatch.apply_patch(original, list(out.patch))
    assert patched == out.pod
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(out.pod, version, strict=True)
    names = [c["name"] for c in out.pod["spec"]["initContainers"]]
    assert names == [INIT_NAME, PROXY_NAME]
    assert json.loads(out.pod["metadata"]["annotations"][STATUS])["version"] == "1"


def test_our_containers_go_first_before_the_apps_own_init_containers() -> None:
    obj = pod(initContainers=[{"name": "migrate", "image": "m:1"}], volumes=[{"name": "data", "emptyDir": {}}])
    out = injected(obj)
    assert jsonpatch.apply_patch(obj, list(out.patch)) == out.pod
    assert [c["name"] for c in out.pod["spec"]["initContainers"]] == [INIT_NAME, PROXY_NAME, "migrate"]
    assert out.pod["spec"]["volumes"][0]["name"] == "data"
    kubernetes_validate.validate(out.pod, K8S_VERSIONS[-1], strict=True)


def test_capture_init_has_only_net_admin_and_net_raw() -> None:
    init = init_containers(injected(pod()).pod)[INIT_NAME]
    assert init["args"][:2] == ["proxy", "capture"]
    sc = init["securityContext"]
    assert sc["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert "restartPolicy" not in init


def test_sidecar_is_native_runs_as_proxy_uid_read_only_with_probes_and_token() -> None:
    out = injected(pod())
    proxy = init_containers(out.pod)[PROXY_NAME]
    assert proxy["restartPolicy"] == "Always"
    assert proxy["args"] == ["proxy", "run"]
    sc = proxy["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (1337, 1337, True)
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert proxy["startupProbe"]["httpGet"]["port"] == 15021
    vols = {v["name"]: v for v in out.pod["spec"]["volumes"]}
    token = vols["meshfed-xds-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "meshfed"
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    env = {e["name"]: e for e in proxy["env"]}
    assert env["MESHFED_XDS_TOKEN_FILE"]["value"].startswith(mounts["meshfed-xds-token"] + "/")
    assert out.pod["spec"]["securityContext"] == {"fsGroup": 1337}


def test_downward_api_and_capture_metadata() -> None:
    obj = pod()
    obj["spec"]["containers"][0]["ports"].append({"name": "grpc-api", "containerPort": 7070})
    env = {e["name"]: e for e in init_containers(injected(obj).pod)[PROXY_NAME]["env"]}
    fields = {k: v["valueFrom"]["fieldRef"]["fieldPath"] for k, v in env.items() if "valueFrom" in v}
    assert fields == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_IP": "status.podIP",
                      "SERVICE_ACCOUNT": "spec.serviceAccountName", "NODE_NAME": "spec.nodeName"}
    values = {k: v["value"] for k, v in env.items() if "value" in v}
    assert values["MESHFED_CAPTURE"] == "redirect"
    assert values["MESHFED_INBOUND_CAPTURE_PORT"] == "15006"
    assert values["MESHFED_CAPTURE_BIND"] == "0.0.0.0"
    assert values["MESHFED_CLUSTER"] == "east"
    assert values["MESHFED_INBOUND"] == "7070:7070:grpc-api:grpc,9080:9080:http:http"


def test_injecting_an_injected_pod_changes_nothing() -> None:
    once = injected(pod()).pod
    again = inject(once, CONFIG)
    assert isinstance(again, Skipped) and "already injected" in again.reason


def test_existing_fs_group_and_security_context_are_kept() -> None:
    obj = pod(securityContext={"runAsNonRoot": True, "fsGroup": 2000})
    out = injected(obj)
    assert out.pod["spec"]["securityContext"] == {"runAsNonRoot": True, "fsGroup": 2000}
    obj2 = pod(securityContext={"runAsNonRoot": True})
    out2 = injected(obj2)
    assert jsonpatch.apply_patch(obj2, list(out2.patch)) == out2.pod
    assert out2.pod["spec"]["securityContext"] == {"runAsNonRoot": True, "fsGroup": 1337}


def test_opt_out() -> None:
    obj = pod(hostNetwork=True)  # would be refused, but the pod opted out first
    obj["metadata"]["annotations"] = {"meshfed.io/inject": "false"}
    out = inject(obj, CONFIG)
    assert isinstance(out, Skipped) and "false" in out.reason


def test_exclude_annotations_become_capture_flags() -> None:
    obj = pod()
    obj["metadata"]["annotations"] = {"meshfed.io/excludeOutboundIPRanges": "10.96.0.0/12, fd00::/8",
                                      "meshfed.io/excludeOutboundPorts": "5432,6000:6010",
                                      "meshfed.io/excludeInboundPorts": "22"}
    args = init_containers(injected(obj).pod)[INIT_NAME]["args"]
    flags = dict(zip(args[2::2], args[3::2], strict=True))
    assert flags["--exclude-outbound-cidrs"] == "10.96.0.0/12,fd00::/8"
    assert flags["--exclude-outbound-ports"] == "5432,6000-6010"
    assert flags["--exclude-inbound-ports"] == "22"
    assert flags["--proxy-uid"] == "1337"


def test_the_capture_flags_are_the_real_commands() -> None:
    from click.testing import CliRunner

    from meshfed.cli import cli

    obj = pod()
    obj["metadata"]["annotations"] = {"meshfed.io/excludeOutboundPorts": "5432,6000:6010"}
    args = init_containers(injected(obj).pod)[INIT_NAME]["args"]
    result = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "--dport 6000:6010 -j RETURN" in result.output


def test_resources_by_annotation() -> None:
    obj = pod()
    obj["metadata"]["annotations"] = {"meshfed.io/proxyCPU": "250m", "meshfed.io/proxyMemoryLimit": "512Mi",
                                      "meshfed.io/proxyCPULimit": "2"}
    res = init_containers(injected(obj).pod)[PROXY_NAME]["resources"]
    assert res == {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi", "cpu": "2"}}


@pytest.mark.parametrize(("change", "field"), [
    (lambda p: p["spec"].update(hostNetwork=True), "spec.hostNetwork"),
    (lambda p: p["spec"]["containers"][0]["ports"].append({"containerPort": 15006}),
     "spec.containers[0].ports[1].containerPort"),
    (lambda p: p["spec"]["containers"].append({"name": "x", "image": "x", "ports": [{"containerPort": 15090}]}),
     "spec.containers[1].ports[0].containerPort"),
    (lambda p: p["spec"].update(initContainers=[{"name": "s", "image": "s", "restartPolicy": "Always",
                                                 "ports": [{"containerPort": 15021}]}]),
     "spec.initContainers[0].ports[0].containerPort"),
    (lambda p: p["spec"]["containers"][0]["ports"].append({"containerPort": 15020}),
     "spec.containers[0].ports[1].containerPort"),
    (lambda p: p["spec"]["containers"].append({"name": "meshfed-proxy", "image": "x"}), "spec.containers[1].name"),
    (lambda p: p["spec"].update(initContainers=[{"name": "meshfed-init", "image": "x"}]),
     "spec.initContainers[0].name"),
    (lambda p: p["spec"].update(volumes=[{"name": "meshfed-run", "emptyDir": {}}]), "spec.volumes[0].name"),
    (lambda p: p["spec"].update(securityContext={"runAsUser": 1337}), "spec.securityContext.runAsUser"),
    (lambda p: p["spec"]["containers"][0].update(securityContext={"runAsUser": 1337}),
     "spec.containers[0].securityContext.runAsUser"),
    (lambda p: p["metadata"].update(annotations={"meshfed.io/excludeInboundPorts": "ssh"}),
     'metadata.annotations["meshfed.io/excludeInboundPorts"]'),
    (lambda p: p["metadata"].update(annotations={"meshfed.io/excludeOutboundIPRanges": "10.0.0.1/8"}),
     'metadata.annotations["meshfed.io/excludeOutboundIPRanges"]'),
    (lambda p: p["metadata"].update(annotations={"meshfed.io/proxyCPU": "lots"}),
     'metadata.annotations["meshfed.io/proxyCPU"]'),
    (lambda p: p["metadata"].update(annotations={"meshfed.io/inject": "no"}),
     'metadata.annotations["meshfed.io/inject"]'),
    (lambda p: p["metadata"].update(annotations={"meshfed.io/proxyCpu": "1"}),
     'metadata.annotations["meshfed.io/proxyCpu"]'),
    (lambda p: p["spec"].update(containers=[]), "spec.containers"),
    (lambda p: p.pop("spec"), "spec"),
])
def test_refusals_name_the_field(change: Any, field: str) -> None:
    obj = pod()
    change(obj)
    with pytest.raises(InjectError) as err:
        inject(obj, CONFIG)
    assert err.value.field == field
    assert str(err.value).startswith(field + ": ")


def test_udp_port_on_a_reserved_number_is_fine_and_prefix_names_template_fields() -> None:
    obj = pod()
    obj["spec"]["containers"][0]["ports"].append({"containerPort": 15001, "protocol": "UDP"})
    injected(obj)
    obj["spec"]["hostNetwork"] = True
    with pytest.raises(InjectError) as err:
        inject(obj, CONFIG, prefix="spec.template.")
    assert err.value.field == "spec.template.spec.hostNetwork"


# ------------------------------------------------------------------------------------ template grpc (proxyless)

GRPC_CONFIG = InjectConfig(cluster="east", image="ghcr.io/meshfed/meshfed:0.1.0",
                           xds_address="meshfed-controlplane.meshfed-system.svc:15010",
                           xds_mtls_address="meshfed-controlplane.meshfed-system.svc:15012")


def grpc_pod(**spec: Any) -> dict[str, Any]:
    obj = pod(**spec)
    obj["metadata"]["annotations"] = {TEMPLATES: "grpc"}
    obj["spec"]["containers"][0]["ports"] = [{"name": "grpc", "containerPort": 7070}]
    return obj


def test_grpc_template_gives_the_agent_and_no_envoy_or_capture() -> None:
    original = grpc_pod(volumes=[{"name": "data", "emptyDir": {}}])
    original["spec"]["containers"][0]["env"] = [{"name": "LOG", "value": "1"}]
    out = inject(original, GRPC_CONFIG)
    assert isinstance(out, Injected)
    assert jsonpatch.apply_patch(original, list(out.patch)) == out.pod
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(out.pod, version, strict=True)
    spec = out.pod["spec"]
    [agent] = spec["initContainers"]
    assert agent["name"] == PROXY_NAME and agent["args"] == ["proxy", "run", "--grpc"]
    assert agent["restartPolicy"] == "Always" and agent["securityContext"]["runAsUser"] == 1337
    assert "NET_ADMIN" not in json.dumps(agent)
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["MESHFED_XDS_MTLS_ADDRESS"] == "meshfed-controlplane.meshfed-system.svc:15012"
    assert env["MESHFED_INBOUND"] == "7070:7070:grpc:grpc" and env["MESHFED_CAPTURE"] == "none"
    assert [v["name"] for v in spec["volumes"]] == ["data", "meshfed-xds-token", "meshfed-run"]
    app = spec["containers"][0]
    assert app["env"] == [{"name": "LOG", "value": "1"}, {"name": "GRPC_XDS_BOOTSTRAP", "value": GRPC_BOOTSTRAP},
                          {"name": "GRPC_EXPERIMENTAL_XDS_SNI", "value": "true"}]
    assert app["volumeMounts"] == [{"name": "meshfed-run", "mountPath": "/var/run/meshfed/grpc",
                                    "subPath": "grpc", "readOnly": True}]
    assert spec["securityContext"] == {"fsGroup": 1337}  # the app reads the group-readable key
    status = json.loads(out.pod["metadata"]["annotations"][STATUS])
    assert status["template"] == "grpc" and status["initContainers"] == [PROXY_NAME]
    assert INIT_NAME not in json.dumps(out.pod)


def test_grpc_template_is_idempotent_and_opt_out_still_wins() -> None:
    once = inject(grpc_pod(), GRPC_CONFIG)
    assert isinstance(once, Injected)
    again = inject(once.pod, GRPC_CONFIG)
    assert isinstance(again, Skipped) and "already injected" in again.reason
    opted = grpc_pod()
    opted["metadata"]["annotations"]["meshfed.io/inject"] = "false"
    out = inject(opted, GRPC_CONFIG)
    assert isinstance(out, Skipped) and "false" in out.reason


def test_grpc_template_errors_name_the_annotation() -> None:
    bad = grpc_pod()
    bad["metadata"]["annotations"][TEMPLATES] = "grcp"
    with pytest.raises(InjectError, match=r'annotations\["inject.meshfed.io/templates"\].*not a template'):
        inject(bad, GRPC_CONFIG)
    with pytest.raises(InjectError, match="mutual-TLS ADS"):
        inject(grpc_pod(), CONFIG)  # no xds_mtls_address configured


def test_grpc_template_refuses_an_app_that_sets_what_it_adds() -> None:
    env = grpc_pod()
    env["spec"]["containers"][0]["env"] = [{"name": "GRPC_XDS_BOOTSTRAP", "value": "/etc/b.json"}]
    with pytest.raises(InjectError, match=r"spec\.containers\[0\]\.env\[0\]\.name: GRPC_XDS_BOOTSTRAP"):
        inject(env, GRPC_CONFIG)
    mount = grpc_pod(volumes=[{"name": "x", "emptyDir": {}}])
    mount["spec"]["containers"][0]["volumeMounts"] = [{"name": "x", "mountPath": "/var/run/meshfed/grpc/"}]
    with pytest.raises(InjectError, match=r"volumeMounts\[0\]\.mountPath"):
        inject(mount, GRPC_CONFIG)


def test_grpc_template_on_a_deployment_validates() -> None:
    template = grpc_pod()
    template["metadata"].pop("name")
    template.pop("apiVersion")
    template.pop("kind")
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo", "namespace": "default"},
                  "spec": {"selector": {"matchLabels": {"app": "reviews"}}, "template": template}}
    out = inject_object(deployment, GRPC_CONFIG)
    assert out.notes == ("injected",)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(out.obj, version, strict=True)
    assert [c["name"] for c in out.obj["spec"]["template"]["spec"]["initContainers"]] == [PROXY_NAME]


def _with_probes() -> dict[str, Any]:
    obj = pod()
    app = obj["spec"]["containers"][0]
    app["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http",
                                         "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                             "periodSeconds": 7, "timeoutSeconds": 2}
    app["livenessProbe"] = {"tcpSocket": {"port": 9080}, "initialDelaySeconds": 3}
    app["startupProbe"] = {"exec": {"command": ["true"]}}
    return obj


def test_http_and_tcp_probes_move_to_the_agent_with_their_originals() -> None:
    original = _with_probes()
    out = injected(original)
    assert jsonpatch.apply_patch(original, list(out.patch)) == out.pod
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(out.pod, version, strict=True)
    app = out.pod["spec"]["containers"][0]
    assert app["readinessProbe"] == {"httpGet": {"path": "/app-health/app/readyz", "port": 15020, "scheme": "HTTP"},
                                     "periodSeconds": 7, "timeoutSeconds": 2}
    assert app["livenessProbe"] == {"httpGet": {"path": "/app-health/app/livez", "port": 15020, "scheme": "HTTP"},
                                    "initialDelaySeconds": 3}
    assert app["startupProbe"] == {"exec": {"command": ["true"]}}  # exec does not cross the capture: kept
    env = {e["name"]: e.get("value") for e in init_containers(out.pod)[PROXY_NAME]["env"]}
    assert json.loads(env["MESHFED_APP_PROBES"]) == {
        "/app-health/app/readyz": {"httpGet": {"path": "/ready", "port": 9080,  # the named port, resolved
                                               "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                                   "timeoutSeconds": 2},
        "/app-health/app/livez": {"tcpSocket": {"port": 9080}, "timeoutSeconds": 1},
    }
    status = json.loads(out.pod["metadata"]["annotations"][STATUS])
    assert status["probes"] == ["/app-health/app/livez", "/app-health/app/readyz"]  # liveness, readiness, startup
    again = inject(out.pod, CONFIG)
    assert isinstance(again, Skipped)  # the rewritten probes are not rewritten twice


def test_probe_rewrite_opt_out_grpc_template_and_a_bad_named_port() -> None:
    kept = _with_probes()
    kept["metadata"]["annotations"] = {"meshfed.io/rewriteAppProbes": "false"}
    out = injected(kept)
    assert out.pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == "http"
    assert "MESHFED_APP_PROBES" not in {e["name"] for e in init_containers(out.pod)[PROXY_NAME]["env"]}
    grpc = _with_probes()
    grpc["metadata"]["annotations"] = {TEMPLATES: "grpc"}
    config = InjectConfig(cluster="east", image="i", xds_address="cp:15010", xds_mtls_address="cp:15012")
    out_grpc = inject(grpc, config)
    assert isinstance(out_grpc, Injected)
    assert out_grpc.pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/ready"  # no capture
    bad = _with_probes()
    bad["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = "metrics"
    with pytest.raises(InjectError) as err:
        inject(bad, CONFIG)
    assert err.value.field == "spec.containers[0].readinessProbe.httpGet.port"
    assert "'metrics' names no port of container 'app' (its ports: http)" in str(err.value)
