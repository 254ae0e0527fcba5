"""The RBAC compiler: Istio's decision semantics (``decide``) and the Envoy configuration the sidecar gets."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import yaml
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from discovery.authz import AuthorizationPolicy, ValueMatch, ValueMatchKind
from discovery.convert import convert
from discovery.model import Registry, Service, ServiceKey, ServicePort, namespace
from gateway import generators as g
from gateway import rbac
from gateway.context import InboundPort, ProxyInfo, ProxyKind, PushContext
from gateway.generators import inbound_authz
from gateway.rbac import Decision, Request, decide
from tests.gateway.mesh_fixtures import RATINGS, TD, WEST, Mesh

SLEEP = f"spiffe://{TD}/ns/default/sa/sleep"
OTHER = f"spiffe://{TD}/ns/default/sa/other"
FOO = f"spiffe://{TD}/ns/foo/sa/app"


def policy(spec: dict[str, Any], name: str = "p", ns: str = "default") -> AuthorizationPolicy:
    obj = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec}
    out = convert(obj, cluster=WEST)
    assert isinstance(out, AuthorizationPolicy)
    return out


def req(principal: str = SLEEP, cluster: str = "east", port: int = 9080, method: str = "GET", path: str = "/",
        headers: dict[str, str] | None = None) -> Request:
    return Request(principal=principal, cluster=cluster, port=port, method=method, path=path, headers=headers or {})


def split(*policies: AuthorizationPolicy) -> tuple[tuple[AuthorizationPolicy, ...], tuple[AuthorizationPolicy, ...]]:
    return rbac.select(policies, "default", {"app": "ratings"})


# ---- semantics ---------------------------------------------------------------------------------------------------


def test_no_policy_allows() -> None:
    assert decide((), (), req()) == Decision(True)


def test_allow_policy_without_rules_denies_everything_and_rules_of_one_empty_rule_allow_everything() -> None:
    nothing = policy({})
    assert decide(*split(nothing), req()) == Decision(False, "none")
    everything = policy({"rules": [{}]}, name="all")
    assert decide(*split(everything), req(principal=FOO, cluster="west")) == Decision(True, "default.all")
    # Together: any matching ALLOW policy allows.
    assert decide(*split(nothing, everything), req()).allowed


def test_deny_without_rules_matches_nothing_and_deny_all_denies() -> None:
    assert decide(*split(policy({"action": "DENY"})), req()) == Decision(True)
    deny_all = policy({"action": "DENY", "rules": [{}]}, name="deny-all")
    assert decide(*split(deny_all), req()) == Decision(False, "default.deny-all")


def test_deny_is_evaluated_before_allow() -> None:
    allow = policy({"rules": [{}]}, name="allow-all")
    deny = policy({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}, name="no-admin")
    deny_split = split(allow, deny)
    assert decide(*deny_split, req(path="/admin/x")) == Decision(False, "default.no-admin")
    assert decide(*deny_split, req(path="/ratings")) == Decision(True, "default.allow-all")


def test_with_an_allow_policy_what_matches_none_is_denied() -> None:
    allow = policy({"rules": [{"from": [{"source": {"principals": [f"{TD}/ns/default/sa/sleep"]}}]}]})
    assert decide(*split(allow), req()).allowed
    assert decide(*split(allow), req(principal=OTHER)) == Decision(False, "none")
    assert Decision(False, "none").details == "rbac_access_denied_matched_policy[none]"


def test_sources_principals_and_namespaces() -> None:
    p = policy({"rules": [{"from": [
        {"source": {"principals": ["*/sa/sleep"], "notPrincipals": [f"{TD}/ns/bad/sa/sleep"]}},
        {"source": {"namespaces": ["fo*"], "notNamespaces": ["food"]}},
    ]}]})
    allowed = split(p)
    assert decide(*allowed, req(SLEEP)).allowed
    assert not decide(*allowed, req(f"spiffe://{TD}/ns/bad/sa/sleep")).allowed
    assert decide(*allowed, req(FOO)).allowed
    assert not decide(*allowed, req(f"spiffe://{TD}/ns/food/sa/app")).allowed
    assert not decide(*allowed, req(OTHER)).allowed


def test_source_cluster_condition() -> None:
    p = policy({"rules": [{"from": [{"source": {"principals": [f"{TD}/ns/default/sa/sleep"]}}],
                           "when": [{"key": "source.cluster", "values": ["east"]}]}]})
    assert decide(*split(p), req(cluster="east")).allowed
    assert not decide(*split(p), req(cluster="west")).allowed
    not_west = policy({"action": "DENY", "rules": [{"when": [{"key": "source.cluster", "notValues": ["west"]}]}]})
    assert decide(*split(not_west), req(cluster="west")).allowed
    assert not decide(*split(not_west), req(cluster="east")).allowed


def test_operations_ports_methods_paths() -> None:
    p = policy({"rules": [{"to": [
        {"operation": {"ports": ["9080"], "methods": ["GET", "HEAD"], "paths": ["/ratings/*", "*.json", "/exact"],
                       "notPaths": ["/ratings/private*"]}},
        {"operation": {"methods": ["POST"], "notPorts": ["9080"]}},
    ]}]})
    s = split(p)
    assert decide(*s, req(path="/ratings/1")).allowed
    assert decide(*s, req(path="/ratings/1?x=/admin")).allowed  # the query string is not part of the path
    assert decide(*s, req(path="/data/x.json", method="HEAD")).allowed
    assert decide(*s, req(path="/exact")).allowed
    assert not decide(*s, req(path="/exact/more")).allowed
    assert not decide(*s, req(path="/ratings/private/1")).allowed
    assert not decide(*s, req(path="/ratings/1", method="DELETE")).allowed
    assert not decide(*s, req(path="/ratings/1", port=9443)).allowed
    assert decide(*s, req(path="/anything", method="POST", port=9443)).allowed
    assert not decide(*s, req(path="/anything", method="POST", port=9080)).allowed


def test_when_namespace_principal_and_headers() -> None:
    p = policy({"rules": [{"when": [
        {"key": "source.namespace", "values": ["default"]},
        {"key": "source.principal", "notValues": ["*/sa/other"]},
        {"key": "request.headers[X-Tenant]", "values": ["acme", "beta*"]},
    ]}]})
    s = split(p)
    assert decide(*s, req(headers={"x-tenant": "acme"})).allowed
    assert decide(*s, req(headers={"X-Tenant": "beta-2"})).allowed
    assert not decide(*s, req(headers={"x-tenant": "gamma"})).allowed
    assert not decide(*s, req()).allowed  # header absent
    assert not decide(*s, req(OTHER, headers={"x-tenant": "acme"})).allowed
    assert not decide(*s, req(FOO, headers={"x-tenant": "acme"})).allowed


def test_selection_by_labels_namespace_and_root_namespace() -> None:
    scoped = policy({"selector": {"matchLabels": {"app": "ratings"}}}, name="scoped")
    other_app = policy({"selector": {"matchLabels": {"app": "reviews"}}}, name="reviews")
    ns_wide = policy({"action": "DENY"}, name="ns-wide")
    elsewhere = policy({}, name="x", ns="foo")
    mesh = policy({"action": "DENY"}, name="mesh", ns="istio-system")
    deny, allow = rbac.select([scoped, other_app, ns_wide, elsewhere, mesh], "default", {"app": "ratings"})
    assert [p.policy_id for p in deny] == ["default.ns-wide", "istio-system.mesh"]
    assert [p.policy_id for p in allow] == ["default.scoped"]


def test_workload_labels_from_service_selectors_or_app_name() -> None:
    reviews = ServiceKey.parse("reviews.default")
    labels = rbac.workload_labels([RATINGS, reviews], {RATINGS: (("app", "ratings-app"), ("tier", "back"))})
    assert labels == {"app": "ratings-app", "tier": "back"}
    assert rbac.workload_labels([reviews], {}) == {"app": "reviews"}


# ---- Envoy configuration -----------------------------------------------------------------------------------------


def _unpack(f: Any) -> Any:
    config = http_rbac_pb2.RBAC()
    assert f.typed_config.Unpack(config)
    return config


def test_filters_deny_then_allow_named_per_policy_and_rule() -> None:
    allow = policy({"rules": [{"from": [{"source": {"principals": [f"{TD}/ns/default/sa/sleep"]}}]},
                              {"to": [{"operation": {"methods": ["GET"]}}]}]}, name="allow")
    deny = policy({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}, name="deny")
    filters = rbac.rbac_filters(*split(allow, deny))
    assert [f.name for f in filters] == [rbac.RBAC_FILTER, rbac.RBAC_FILTER]
    first, second = (_unpack(f) for f in filters)
    assert first.rules.action == rbac_pb2.RBAC.DENY and list(first.rules.policies) == ["default.deny"]
    assert second.rules.action == rbac_pb2.RBAC.ALLOW
    assert sorted(second.rules.policies) == ["default.allow:rules[0]", "default.allow:rules[1]"]
    assert first.rules_stat_prefix != second.rules_stat_prefix and first.track_per_rule_stats
    principal = second.rules.policies["default.allow:rules[0]"].principals[0]
    assert principal.authenticated.principal_name.exact == SLEEP
    path = first.rules.policies["default.deny"].permissions[0]
    assert path.url_path.path.prefix == "/admin"


def test_allow_nothing_compiles_to_an_allow_filter_without_policies_and_no_policy_to_no_filter() -> None:
    (only,) = rbac.rbac_filters(*split(policy({})))
    config = _unpack(only)
    assert config.rules.action == rbac_pb2.RBAC.ALLOW and len(config.rules.policies) == 0  # Envoy: deny all
    assert rbac.rbac_filters((), ()) == []


def test_source_cluster_matches_the_sidecar_set_xfcc_subject() -> None:
    regex = re.compile(rbac.cluster_regex(ValueMatch(ValueMatchKind.EXACT, "east")))
    ok = f'By=spiffe://{TD}/ns/default/sa/ratings;Hash=ab12;Subject="OU=east,O={TD}";URI={SLEEP}'
    assert regex.fullmatch(ok)
    assert regex.fullmatch(f'Hash=ab;Subject="O={TD},OU=east";URI={SLEEP}')
    assert not regex.fullmatch(ok.replace("OU=east", "OU=west"))
    assert not regex.fullmatch(ok.replace("OU=east", "OU=east2"))
    assert not regex.fullmatch(ok.replace("OU=east", "OU=beast"))
    assert not regex.fullmatch(f"By=x;URI=spiffe://{TD}/ns/OU=east/sa/x")
    p = policy({"rules": [{"when": [{"key": "source.cluster", "values": ["east"]}]}]})
    (f,) = rbac.rbac_filters(*split(p))
    header = _unpack(f).rules.policies["default.p"].principals[0].header
    assert header.name == "x-forwarded-client-cert"
    assert header.string_match.safe_regex.regex == rbac.cluster_regex(ValueMatch(ValueMatchKind.EXACT, "east"))


def _sidecar_listener(ctx: PushContext) -> Any:
    proxy = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=WEST, namespace=namespace("default"), service_account="ratings",
                      node_id="sidecar~10.0.0.1~ratings-1.default~default.svc.cluster.local", services=(RATINGS,),
                      inbound=(InboundPort(15006, 9080, "http"),))
    listeners = g.generate_all(proxy, ctx)[g.LISTENER_TYPE]
    hcm = hcm_pb2.HttpConnectionManager()
    assert listeners["inbound|15006"].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def test_inbound_listener_carries_rbac_before_router_and_a_denial_log_naming_policies() -> None:
    mesh = Mesh(east_gateway_port=15443, west_gateway_port=15443)
    mesh.pods[(WEST, RATINGS)] = [("10.0.0.1", 15006)]
    docs = yaml.safe_load_all("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  rules: [{from: [{source: {principals: ["meshfed.test/ns/default/sa/sleep"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-mine, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules: [{}]
""")
    authz = tuple(convert(d, cluster=WEST) for d in docs)
    ctx = PushContext(registry=mesh.registry(WEST), trust_domain=TD, authz=authz)
    hcm = _sidecar_listener(ctx)
    names = [f.name for f in hcm.http_filters]
    assert names[-2:] == [rbac.RBAC_FILTER, "envoy.filters.http.router"] and names.count(rbac.RBAC_FILTER) == 1
    assert list(_unpack(hcm.http_filters[-2]).rules.policies) == ["default.allow-sleep"]
    assert hcm.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET
    assert hcm.set_current_client_cert_details.subject.value and hcm.set_current_client_cert_details.uri
    (log,) = [a for a in hcm.access_log if a.filter.HasField("status_code_filter")]
    assert log.filter.status_code_filter.comparison.value.default_value == 403
    stdout = stream_pb2.StdoutAccessLog()
    assert log.typed_config.Unpack(stdout)
    fmt = stdout.log_format.text_format_source.inline_string
    assert "%RESPONSE_CODE_DETAILS%" in fmt and "allow_policies=default.allow-sleep" in fmt
    # Without policies: no RBAC, no log; the subject still reaches the workload in XFCC.
    plain = _sidecar_listener(PushContext(registry=mesh.registry(WEST), trust_domain=TD))
    assert rbac.RBAC_FILTER not in [f.name for f in plain.http_filters]
    assert not [a for a in plain.access_log if a.filter.HasField("status_code_filter")]
    assert plain.set_current_client_cert_details.subject.value


def test_ports_are_resolved_per_inbound_listener_to_the_workload_port() -> None:
    mesh = Mesh(east_gateway_port=15443, west_gateway_port=15443)
    mesh.pods[(WEST, RATINGS)] = [("10.0.0.1", 15006)]
    only_9080 = policy({"rules": [{"to": [{"operation": {"ports": ["9080"]}}]}]}, name="on-9080")
    ctx = PushContext(registry=mesh.registry(WEST), trust_domain=TD, authz=(only_9080,))
    hcm = _sidecar_listener(ctx)  # listener 15006 for the Service port 9080 ("http")
    perm = _unpack(hcm.http_filters[-2]).rules.policies["default.on-9080"].permissions[0]
    assert perm.any  # 9080 names this listener, though it listens on 15006
    other = policy({"rules": [{"to": [{"operation": {"ports": ["9443"], "notPorts": ["9080"]}}]}]}, name="x")
    config = rbac.rbac_config([other], other.action, frozenset({15006, 9080}))
    ports, not_ports = config.policies["default.x"].permissions[0].and_rules.rules
    assert ports.not_rule.any and not_ports.not_rule.any
    # Without a listener (unit use), the port is Envoy's destination port.
    assert rbac.rbac_config([only_9080], only_9080.action).policies["default.on-9080"].permissions[0] \
        .destination_port == 9080


def test_proxyless_servers_fail_closed_on_source_cluster() -> None:
    """A gRPC xDS server has no connection manager to replace a caller-sent x-forwarded-client-cert, so a
    source.cluster condition never holds in an ALLOW rule and always holds in a DENY rule there."""
    allow = policy({"rules": [{"from": [{"source": {"namespaces": ["default"]}}],
                               "when": [{"key": "source.cluster", "values": ["east"]}]}]}, name="allow")
    deny = policy({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/x"]}}],
                                                "when": [{"key": "source.cluster", "notValues": ["east"]}]}]},
                  name="deny")
    d_filter, a_filter = rbac.rbac_filters(*split(allow, deny), cluster_known=False)
    deny_ids = _unpack(d_filter).rules.policies["default.deny"].principals[0]
    allow_ids = _unpack(a_filter).rules.policies["default.allow"].principals[0]
    assert deny_ids.any  # the DENY rule applies whatever the cluster
    never = rbac_pb2.Principal(not_id=rbac_pb2.Principal(any=True))
    assert never in allow_ids.and_ids.ids  # the ALLOW rule cannot match
    assert "x-forwarded-client-cert" not in str(d_filter) + str(a_filter)
    mesh = Mesh(east_gateway_port=15443, west_gateway_port=15443)
    ctx = PushContext(registry=mesh.registry(WEST), trust_domain=TD, authz=(allow,))
    grpc_node = ProxyInfo(kind=ProxyKind.GRPC, cluster=WEST, namespace=namespace("default"), node_id="grpc-1",
                          services=(RATINGS,), inbound=(InboundPort(50051, 50051, "grpc", "grpc"),))
    sidecar = replace(grpc_node, kind=ProxyKind.SIDECAR)
    assert "x-forwarded-client-cert" not in str(inbound_authz.http_filters(grpc_node, ctx, 50051))
    assert "x-forwarded-client-cert" in str(inbound_authz.http_filters(sidecar, ctx, 50051))


def test_paths_are_normalized_like_the_sidecar_does() -> None:
    assert rbac.normalize_path("/./admin/x") == "/admin/x"
    assert rbac.normalize_path("/ratings/../admin") == "/admin"
    assert rbac.normalize_path("/a/b/..") == "/a/"
    assert rbac.normalize_path("/../../admin?x=/y") == "/admin"
    assert rbac.normalize_path("/") == "/"
    deny = policy({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}, name="no-admin")
    assert not decide(*split(deny), req(path="/ratings/../admin/x")).allowed


def test_a_pod_behind_two_services_gets_only_its_own_ports_per_listener() -> None:
    """A one-port Service's port names its own listener, not every listener of a pod it shares with another."""
    echo, ratings = ServiceKey.parse("echo.default"), ServiceKey.parse("ratings.default")
    services = [Service(cluster=WEST, key=echo, ports=(ServicePort(port=5432, name="tcp-echo"),
                                                       ServicePort(port=5433, name="tcp-other"))),
                Service(cluster=WEST, key=ratings, ports=(ServicePort(port=80, target_port=9080, name="http"),))]
    ctx = PushContext(registry=Registry(local=WEST).with_shard(WEST, services), trust_domain=TD)
    proxy = ProxyInfo(kind=ProxyKind.SIDECAR, cluster=WEST, namespace=namespace("default"), service_account="echo",
                      node_id="sidecar~10.0.0.1~echo-1.default~default.svc.cluster.local", services=(echo, ratings),
                      inbound=(InboundPort(5433, 5433, "tcp-other"), InboundPort(15006, 9080, "http"),
                               InboundPort(7000, 7000)))
    assert inbound_authz.listener_ports(proxy, 5433, ctx) == {5433}
    assert inbound_authz.listener_ports(proxy, 15006, ctx) == {15006, 9080}
    # an unnamed listener: names cannot tell, so a one-port Service's port counts as the one it serves
    assert inbound_authz.listener_ports(proxy, 7000, ctx) == {7000, 9080}
