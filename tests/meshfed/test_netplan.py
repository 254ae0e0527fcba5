"""The netns plan (pure): addresses, names, slots, and the rules text it hands to iptables-restore."""

from __future__ import annotations

import ipaddress

import pytest

from meshfed import netplan


def plan() -> netplan.NetPlan:
    return netplan.plan_network("ab12", 1, ["east", "west"],
                                [("east", "sleep-east"), ("east", "reviews-east-0"), ("west", "ratings-west-0")])


def test_every_cluster_its_own_16_inside_the_slot_and_pods_numbered_per_cluster() -> None:
    p = plan()
    assert p.slot_cidr == "10.16.0.0/12"
    assert [c.cidr for c in p.clusters] == ["10.17.0.0/16", "10.18.0.0/16"]
    assert [c.root_ip for c in p.clusters] == ["10.17.0.1", "10.18.0.1"]
    assert [(x.workload, x.ip) for x in p.pods] == [("sleep-east", "10.17.1.1"), ("reviews-east-0", "10.17.1.2"),
                                                  ("ratings-west-0", "10.18.1.1")]
    assert p.public_cidr == "10.16.0.0/24" and p.public_root_ip == "10.16.0.1"
    assert [c.gateway.public_ip for c in p.clusters] == ["10.16.0.10", "10.16.0.11"]
    slot = ipaddress.ip_network(p.slot_cidr)
    for net in (p.public_cidr, p.vip_cidr, *(c.cidr for c in p.clusters)):
        assert ipaddress.ip_network(net).subnet_of(slot)  # type: ignore[arg-type]
    clusters = [ipaddress.ip_network(c.cidr) for c in p.clusters]
    assert not clusters[0].overlaps(clusters[1])
    assert not ipaddress.ip_network(p.vip_cidr).overlaps(clusters[0])
    alloc, vips = ipaddress.ip_network(p.vip_alloc_cidr), ipaddress.ip_network(p.vip_cidr)
    assert alloc.subnet_of(vips) and ipaddress.ip_address(p.vip_root_ip) in vips  # type: ignore[arg-type]
    assert ipaddress.ip_address(p.vip_root_ip) not in alloc  # never handed out as a ClusterSetIP


def test_names_are_the_runs_own_and_fit_the_kernel() -> None:
    p = plan()
    assert all(n.startswith("mf-ab12-") for n in p.namespaces())
    every_link = [*p.bridges(), *(x.host_if for x in p.pods),
                  *(i for c in p.clusters for i in (c.gateway.cluster_host_if, c.gateway.public_host_if))]
    assert len(set(every_link)) == len(every_link)
    assert all(len(n) <= 15 and netplan.is_ours(n, "ab12") for n in every_link)
    assert not netplan.is_ours("eth0", "ab12") and not netplan.is_ours("mf-ab13-sleep", "ab12")
    assert not netplan.is_ours("mf-ab12-x", "../x")


def test_slot_skips_what_the_root_namespace_has() -> None:
    assert netplan.free_slot(["192.0.2.0/24", "127.0.0.1/8"]) == 0
    assert netplan.free_slot(["10.0.3.0/24"]) == 1
    assert netplan.free_slot(["10.0.0.0/8"]) is None
    assert netplan.free_slot(["default", "not an address", "10.20.0.1/32"]) == 0  # 10.20 is in slot 1


def test_limits_are_named() -> None:
    with pytest.raises(netplan.NetPlanError, match="at most 14"):
        netplan.plan_network("ab12", 0, [f"c{i}" for i in range(15)], [])
    with pytest.raises(netplan.NetPlanError, match="unique"):
        netplan.plan_network("ab12", 0, ["east"], [("east", "a"), ("east", "a")])
    with pytest.raises(netplan.NetPlanError, match="no cluster"):
        netplan.plan_network("ab12", 0, ["east"], [("north", "a")])
    with pytest.raises(netplan.NetPlanError, match="4 hex"):
        netplan.plan_network("x; rm", 0, ["east"], [])


def test_the_plan_round_trips_through_state_json() -> None:
    import json

    from meshfed import runstate

    p = plan()
    state = runstate.RunState(clusterset="c", name="n", run_dir="r", trust_domain="t", started_at=1.0,
                              network=runstate.NetworkState(mode="netns", run_id=p.run_id, plan=p))
    assert runstate.decode(json.loads(json.dumps(runstate.encode(state)))).network.plan == p
    data = runstate.encode(state)
    data["network"]["plan"] = {"run_id": "ab12"}
    with pytest.raises(runstate.RunStateError, match=r"network\.plan\.slot: missing"):
        runstate.decode(data)
    data["network"]["plan"] = runstate.encode(state)["network"]["plan"] | {"run_id": "x; rm"}
    with pytest.raises(runstate.RunStateError, match="not 4 hex digits"):
        runstate.decode(data)


def test_rules_stay_inside_the_pod_and_gateway() -> None:
    p = plan()
    pod = p.pods[0]
    assert "nameserver 10.17.0.1" in netplan.resolv_conf(pod)
    rules = netplan.pod_filter_rules(pod)
    assert f"-s {pod.root_ip} --dport 15000 -j ACCEPT" in rules and "--dports 15000,15001 -j DROP" in rules
    gw = netplan.gateway_rules(p, p.clusters[0])
    assert "-o eth1 -d 10.16.0.11/32 -j DROP" in netplan.partition_rules(p.clusters[0], ["10.16.0.11"])
    assert "-A POSTROUTING -s 10.17.0.0/16 -o eth1 -j MASQUERADE" in gw
    assert ":FORWARD DROP" in gw and "-d 10.16.0.0/24 -j ACCEPT" in gw
    assert gw.index("-d 10.16.0.1/32 -j DROP") < gw.index("-j ACCEPT")  # pods never reach the root's public address
