"""The netns edge against the real kernel: what a plan builds reaches what it should and nothing else, a partition
cuts the public leg, and teardown removes everything, also after a build that failed halfway."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping

import pytest

from meshfed import netns, netplan

pytestmark = [
    pytest.mark.skipif(not netns.available()[0], reason=f"netns bed unavailable: {netns.available()[1]}"),
    pytest.mark.timeout(120),
]

CONNECT = ("import socket, sys\n"
           "try:\n"
           "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close(); print('ok')\n"
           "except OSError as exc:\n"
           "    print(type(exc).__name__, exc.errno)\n")


def connect(ns: str, host: str, port: int) -> str:
    return netns.run(netns.in_ns(ns, [sys.executable, "-I", "-c", CONNECT, host, str(port)])).stdout.strip()


@pytest.fixture
def built() -> Iterator[tuple[netplan.NetPlan, list[Mapping[str, str]]]]:
    run_id = netns.new_run_id()
    plan = netplan.plan_network(run_id, netns.pick_slot(), ["east", "west"],
                                [("east", "sleep-east"), ("west", "ratings-west-0")])
    created: list[Mapping[str, str]] = []
    try:
        netns.build(plan, created.append)
        yield plan, created
    finally:
        assert netns.teardown(created, run_id) == []
        assert netns.leftovers(run_id) == []
        assert not any((netns.ETC_NETNS / n).exists() for n in plan.namespaces())


def test_pods_reach_their_root_address_and_the_public_gateways_never_the_other_cluster(
        built: tuple[netplan.NetPlan, list[Mapping[str, str]]]) -> None:
    plan, _ = built
    east, west = plan.pods
    west_gw = plan.cluster("west").gateway
    with socket.socket() as srv:
        srv.bind((east.root_ip, 0))
        srv.listen()
        assert connect(east.netns, east.root_ip, srv.getsockname()[1]) == "ok"
    listener = subprocess.Popen(netns.in_ns(west_gw.netns, [
        sys.executable, "-I", "-c", "import socket, sys\ns = socket.socket(); s.bind(('0.0.0.0', 15443)); s.listen()\n"
        "print('ready', flush=True); sys.stdin.read()"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        assert connect(east.netns, west_gw.public_ip, 15443) == "ok"  # through east's gateway, masqueraded
        assert connect(east.netns, west.ip, 9080) == "OSError 101"  # ENETUNREACH: no route to west's pods
        assert connect(east.netns, west_gw.cluster_ip, 15443) == "OSError 101"
        assert connect(west.netns, east.ip, 9080) == "OSError 101"
        assert netns.partition(plan, "west") is True and netns.partitioned(plan, "west")
        assert netns.partition(plan, "west") is False
        assert connect(east.netns, west_gw.public_ip, 15443).startswith("TimeoutError")
        assert netns.heal(plan, "west") is True and not netns.partitioned(plan, "west")
        assert connect(east.netns, west_gw.public_ip, 15443) == "ok"
    finally:
        listener.communicate(input="", timeout=30)
    resolv = netns.run(netns.in_ns(east.netns, ["cat", "/etc/resolv.conf"])).stdout
    assert f"nameserver {east.root_ip}" in resolv


def test_teardown_after_a_build_that_failed_halfway() -> None:
    run_id = netns.new_run_id()
    plan = netplan.plan_network(run_id, netns.pick_slot(), ["east"], [("east", "a"), ("east", "b")])
    created: list[Mapping[str, str]] = []

    def record(item: Mapping[str, str]) -> None:
        created.append(item)
        if item.get("name") == plan.pods[1].host_if:
            raise RuntimeError("crash while building")

    with pytest.raises(RuntimeError):
        netns.build(plan, record)
    assert netns.leftovers(run_id)  # the half-built bed is there
    assert netns.teardown(created, run_id) == []
    assert netns.leftovers(run_id) == []
    assert not (netns.ETC_NETNS / plan.pods[0].netns).exists()


def test_teardown_never_touches_names_that_are_not_the_runs() -> None:
    assert netns.teardown([{"kind": "link", "name": "eth0"}, {"kind": "netns", "name": "other"},
                           {"kind": "dir", "name": "x", "path": "/etc"}], "ab12") == []
    assert "eth0" in netns.links() or "lo" in netns.links()
    assert os.path.isdir("/etc") and shutil.which("ip")


def test_partition_from_one_peer_only(built: tuple[netplan.NetPlan, list[Mapping[str, str]]]) -> None:
    plan, _ = built
    assert netns.partition(plan, "west", ["east"]) is True
    assert netns.partition(plan, "west", ["east"]) is False
    rules = netns.run(netns.in_ns(plan.cluster("west").gateway.netns, ["iptables-save", "-t", "filter"])).stdout
    east_pub = plan.cluster("east").gateway.public_ip
    assert f"-s {east_pub}/32" in rules and f"-d {east_pub}/32" in rules
    assert netns.partition(plan, "west") is True  # then from everyone
    assert netns.partition(plan, "west", ["east"]) is False
    assert netns.heal(plan, "west") is True and netns.heal(plan, "west") is False
    assert "MESHFED_PARTITION" not in netns.run(
        netns.in_ns(plan.cluster("west").gateway.netns, ["iptables-save", "-t", "filter"])).stdout


def test_the_root_namespace_keeps_every_slot_address_on_our_bridges(
        built: tuple[netplan.NetPlan, list[Mapping[str, str]]]) -> None:
    """A ClusterSetIP or the public network dialled from the root namespace stays on our bridges (never the default
    route), and pods cannot reach the root's public address through their gateway."""
    plan, _ = built
    vip = plan.vip_alloc_cidr.split("/")[0].rsplit(".", 1)[0] + ".7"
    for target in (vip, plan.cluster("west").gateway.public_ip):
        route = netns.run(["ip", "-4", "route", "get", target]).stdout
        assert f"dev {plan.public_bridge}" in route, route
    with socket.socket() as srv:
        srv.bind((plan.public_root_ip, 0))
        srv.listen()
        assert connect(plan.pods[0].netns, plan.public_root_ip, srv.getsockname()[1]).startswith("TimeoutError")


def test_two_runs_building_at_once_get_different_slots() -> None:
    import threading

    plans: list[netplan.NetPlan] = []
    created: dict[str, list[Mapping[str, str]]] = {}
    errors: list[BaseException] = []

    def build_one() -> None:
        run_id = netns.new_run_id()
        created[run_id] = []
        try:
            with netns.slot_lock():
                plan = netplan.plan_network(run_id, netns.pick_slot(), ["east"], [("east", "a")])
                plans.append(plan)
                netns.build(plan, created[run_id].append)
        except BaseException as exc:  # reported below, after both threads ended
            errors.append(exc)

    threads = [threading.Thread(target=build_one) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert len({p.slot for p in plans}) == 2
    finally:
        for run_id, items in created.items():
            assert netns.teardown(items, run_id) == []
