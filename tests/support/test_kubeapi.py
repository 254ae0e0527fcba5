"""Tests of the Kubernetes API test double itself: plain HTTP (urllib) and the real ``kubernetes`` client."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from tests.support.kubeapi import KubeApiDouble, label_selector_matches

SVC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "default"},
       "spec": {"ports": [{"port": 80}]}}


@pytest.fixture
def api() -> Iterator[KubeApiDouble]:
    with KubeApiDouble(history_size=50) as double:
        yield double


def call(api: KubeApiDouble, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
         token: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(api.url + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token or api.admin_token}")
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def watch_lines(api: KubeApiDouble, path: str) -> list[dict[str, Any]]:
    req = urllib.request.Request(api.url + path)
    req.add_header("Authorization", f"Bearer {api.admin_token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return [json.loads(line) for line in resp.read().splitlines() if line.strip()]


def test_list_watch_round_trip_over_plain_http(api: KubeApiDouble) -> None:
    code, created = call(api, "POST", "/api/v1/namespaces/default/services", SVC)
    assert code == 201
    assert created["metadata"]["uid"] and created["metadata"]["creationTimestamp"]
    code, listed = call(api, "GET", "/api/v1/services")
    assert code == 200 and listed["kind"] == "ServiceList"
    list_rv = listed["metadata"]["resourceVersion"]
    assert list_rv == created["metadata"]["resourceVersion"]
    assert [i["metadata"]["name"] for i in listed["items"]] == ["a"]
    assert "kind" not in listed["items"][0]  # as the real server: built-in list items carry no kind

    api.put_object({**SVC, "metadata": {"name": "b", "namespace": "other"}})
    call(api, "PATCH", "/api/v1/namespaces/default/services/a", {"metadata": {"labels": {"x": "1"}}},
         content_type="application/merge-patch+json")
    call(api, "DELETE", "/api/v1/namespaces/default/services/a")
    events = watch_lines(api, f"/api/v1/services?watch=1&resourceVersion={list_rv}&timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "a")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(list_rv)
    # A namespaced watch sees only its namespace.
    events = watch_lines(api, f"/api/v1/namespaces/other/services?watch=true&resourceVersion={list_rv}"
                              "&timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b")]
    # No resourceVersion: synthetic ADDED events for the current state.
    events = watch_lines(api, "/api/v1/services?watch=1&timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b")]


def test_too_old_resource_version_is_an_error_event_with_410(api: KubeApiDouble) -> None:
    api.put_object(SVC)
    old = api.resource_version
    api.put_object({**SVC, "metadata": {"name": "b", "namespace": "default"}})
    compacted = api.compact()
    events = watch_lines(api, f"/api/v1/services?watch=1&resourceVersion={old}&timeoutSeconds=5")
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert status["kind"] == "Status" and status["code"] == 410 and status["reason"] == "Expired"
    assert status["message"] == f"too old resource version: {old} ({compacted})"
    # From the compaction revision on, watching works again.
    events = watch_lines(api, f"/api/v1/services?watch=1&resourceVersion={compacted}&timeoutSeconds=1")
    assert events == []


def test_bounded_history_expires_old_versions(api: KubeApiDouble) -> None:
    start = api.resource_version
    for i in range(60):  # history_size is 50
        api.put_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}"}})
    events = watch_lines(api, f"/api/v1/configmaps?watch=1&resourceVersion={start}&timeoutSeconds=1")
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410
    recent = api.resource_version - 10
    events = watch_lines(api, f"/api/v1/configmaps?watch=1&resourceVersion={recent}&timeoutSeconds=1")
    assert [e["object"]["metadata"]["name"] for e in events] == [f"c{i}" for i in range(50, 60)]


def test_bookmarks_carry_the_newest_version(api: KubeApiDouble) -> None:
    api.put_object(SVC)
    rv = api.resource_version
    result: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: result.extend(watch_lines(
        api, f"/api/v1/services?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=3")))
    t.start()
    api.put_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "unrelated"}})
    newest = api.resource_version
    for _ in range(200):  # wait until the watch is open, then ask for a bookmark
        if api.stats.watches_open:
            break
        threading.Event().wait(0.02)
    api.send_bookmarks()
    t.join(10)
    bookmarks = [e for e in result if e["type"] == "BOOKMARK"]
    assert bookmarks, result
    assert int(bookmarks[-1]["object"]["metadata"]["resourceVersion"]) == newest
    assert all(e["type"] == "BOOKMARK" for e in result)  # the ConfigMap is not a Service event


def test_errors_are_status_bodies(api: KubeApiDouble) -> None:
    assert call(api, "POST", "/api/v1/namespaces/default/services", SVC)[0] == 201
    code, body = call(api, "POST", "/api/v1/namespaces/default/services", SVC)
    assert (code, body["kind"], body["reason"], body["code"]) == (409, "Status", "AlreadyExists", 409)
    assert body["message"] == 'services "a" already exists'
    code, body = call(api, "GET", "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/default/serviceexports/nope")
    assert (code, body["reason"]) == (404, "NotFound")
    assert body["message"] == 'serviceexports.multicluster.x-k8s.io "nope" not found'
    stale = {**SVC, "metadata": {"name": "a", "namespace": "default", "resourceVersion": "1"}}
    code, body = call(api, "PUT", "/api/v1/namespaces/default/services/a", stale)
    assert (code, body["reason"]) == (409, "Conflict")
    code, body = call(api, "GET", "/api/v1/services", token="wrong")
    assert (code, body["reason"]) == (401, "Unauthorized")
    api.inject_error(2)
    assert call(api, "GET", "/api/v1/services")[0] == 500
    assert call(api, "GET", "/api/v1/services")[1]["reason"] == "InternalError"
    assert call(api, "GET", "/api/v1/services")[0] == 200
    # Strategic merge patch is for built-in kinds only, as on the real server.
    api.put_object({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                    "metadata": {"name": "a", "namespace": "default"}})
    code, _ = call(api, "PATCH", "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/default/serviceexports/a",
                   {"metadata": {"labels": {"a": "b"}}}, content_type="application/strategic-merge-patch+json")
    assert code == 415


def test_patches_and_status_subresource(api: KubeApiDouble) -> None:
    path = "/apis/apps/v1/namespaces/default/deployments"
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
           "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}}
    code, created = call(api, "POST", path, dep)
    assert code == 201 and created["status"]["readyReplicas"] == 2 and created["metadata"]["generation"] == 1
    code, patched = call(api, "PATCH", path + "/d", [{"op": "replace", "path": "/spec/replicas", "value": 3}],
                         content_type="application/json-patch+json")
    assert code == 200 and patched["spec"]["replicas"] == 3 and patched["metadata"]["generation"] == 2
    code, applied = call(api, "PATCH", path + "/e?fieldManager=meshfed", {**dep, "metadata": {"name": "e"}},
                         content_type="application/apply-patch+yaml")
    assert code == 201 and applied["metadata"]["name"] == "e"
    se = "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/default/serviceexports"
    code, _ = call(api, "POST", se, {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                                     "metadata": {"name": "s"}, "status": {"conditions": [{"type": "Valid"}]}})
    assert "status" not in api.get_object("multicluster.x-k8s.io/v1alpha1", "ServiceExport", "s", "default")
    code, updated = call(api, "PUT", se + "/s/status", {"metadata": {"name": "s"},
                                                        "status": {"conditions": [{"type": "Valid"}]}})
    assert code == 200 and updated["status"]["conditions"] == [{"type": "Valid"}]


def test_label_selectors() -> None:
    labels = {"app": "web", "tier": "front"}
    assert label_selector_matches("app=web,tier in (front, back)", labels)
    assert label_selector_matches("app,!missing,tier notin (db)", labels)
    assert not label_selector_matches("app!=web", labels)
    assert not label_selector_matches("tier in (db)", labels)


def test_token_review_and_token_request(api: KubeApiDouble) -> None:
    token = api.issue_token("apps", "reviews", audiences=["meshfed"])
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
              "spec": {"token": token, "audiences": ["meshfed", "other"]}}
    code, body = call(api, "POST", "/apis/authentication.k8s.io/v1/tokenreviews", review)
    assert code == 201 and body["status"]["authenticated"] is True
    assert body["status"]["user"]["username"] == "system:serviceaccount:apps:reviews"
    assert body["status"]["audiences"] == ["meshfed"]
    wrong_aud = {**review, "spec": {"token": token, "audiences": ["elsewhere"]}}
    assert call(api, "POST", "/apis/authentication.k8s.io/v1/tokenreviews", wrong_aud)[1]["status"][
        "authenticated"] is False
    unknown = {**review, "spec": {"token": "nope"}}
    assert call(api, "POST", "/apis/authentication.k8s.io/v1/tokenreviews", unknown)[1]["status"][
        "authenticated"] is False
    # TokenRequest needs the ServiceAccount to exist.
    req = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"audiences": ["x"]}}
    assert call(api, "POST", "/api/v1/namespaces/apps/serviceaccounts/sa/token", req)[0] == 404
    api.put_object({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa", "namespace": "apps"}})
    code, issued = call(api, "POST", "/api/v1/namespaces/apps/serviceaccounts/sa/token", req)
    assert code == 201
    review = {**review, "spec": {"token": issued["status"]["token"], "audiences": ["x"]}}
    body = call(api, "POST", "/apis/authentication.k8s.io/v1/tokenreviews", review)[1]
    assert body["status"]["user"]["username"] == "system:serviceaccount:apps:sa"


def test_real_client_through_kubeconfig(api: KubeApiDouble, tmp_path: Path) -> None:
    path = api.write_kubeconfig(tmp_path / "kubeconfig", context="east")
    assert path.stat().st_mode & 0o777 == 0o600
    c = config.new_client_from_config(config_file=str(path), context="east")
    v1 = client.CoreV1Api(c)
    v1.create_namespaced_service("default", SVC)
    with pytest.raises(client.ApiException) as err:
        v1.create_namespaced_service("default", SVC)
    assert err.value.status == 409
    svc = v1.patch_namespaced_service("a", "default", {"metadata": {"labels": {"x": "y"}}})  # strategic merge
    assert svc.metadata.labels == {"x": "y"}
    assert [s.metadata.name for s in v1.list_service_for_all_namespaces().items] == ["a"]
    custom = client.CustomObjectsApi(c)
    custom.create_namespaced_custom_object("multicluster.x-k8s.io", "v1alpha1", "default", "serviceexports",
                                           {"apiVersion": "multicluster.x-k8s.io/v1alpha1",
                                            "kind": "ServiceExport", "metadata": {"name": "a"}})
    listed = custom.list_cluster_custom_object("multicluster.x-k8s.io", "v1alpha1", "serviceexports")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["a"]
    assert client.VersionApi(c).get_code().major == "1"
    groups = client.ApisApi(c).get_api_versions()
    assert "multicluster.x-k8s.io" in [g.name for g in groups.groups]


def test_https_and_multi_context_kubeconfig(tmp_path: Path) -> None:
    with KubeApiDouble(tls=True) as east, KubeApiDouble() as west:
        assert east.url.startswith("https://127.0.0.1:")
        path = east.write_kubeconfig(tmp_path / "kubeconfig", context="east", others={"west": west})
        east.put_object(SVC)
        west.put_object({**SVC, "metadata": {"name": "w", "namespace": "default"}})
        names = {}
        for ctx in ("east", "west"):
            c = config.new_client_from_config(config_file=str(path), context=ctx)
            names[ctx] = [s.metadata.name for s in client.CoreV1Api(c).list_service_for_all_namespaces().items]
        assert names == {"east": ["a"], "west": ["w"]}


MCS_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "serviceexports.multicluster.x-k8s.io"},
    "spec": {"group": "multicluster.x-k8s.io", "scope": "Namespaced",
             "names": {"plural": "serviceexports", "singular": "serviceexport", "kind": "ServiceExport"},
             "versions": [{"name": "v1alpha1", "served": True, "storage": True, "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {"type": "object"}}}]},
}


def test_strict_mode_needs_namespaces_and_crds() -> None:
    with KubeApiDouble(strict=True) as api:
        se = "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceexports"
        export = {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport", "metadata": {"name": "a"}}
        assert call(api, "GET", se)[0] == 404  # no CRD yet
        assert call(api, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", MCS_CRD)[0] == 201
        code, body = call(api, "POST", se, export)
        assert (code, body["message"]) == (404, 'namespaces "shop" not found')
        assert call(api, "POST", "/api/v1/namespaces/default/services", SVC)[0] == 201  # default exists
        assert call(api, "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": "shop"}})[0] == 201
        assert call(api, "POST", se, export)[0] == 201
        code, groups = call(api, "GET", "/apis")
        assert "multicluster.x-k8s.io" in [g["name"] for g in groups["groups"]]
        # Deleting the namespace takes its objects; deleting the CRD stops serving the kind.
        assert call(api, "DELETE", "/api/v1/namespaces/shop")[0] == 200
        assert api.objects("multicluster.x-k8s.io/v1alpha1", "ServiceExport") == []
        assert call(api, "DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                                   "serviceexports.multicluster.x-k8s.io")[0] == 200
        assert call(api, "GET", se)[0] == 404
        events = watch_lines(api, "/api/v1/namespaces?watch=1&resourceVersion=1&timeoutSeconds=1")
        assert [e["type"] for e in events][-2:] == ["ADDED", "DELETED"]
