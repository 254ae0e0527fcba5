"""The network plan of a netns local run (``meshfed up --network netns``): pure, no IO.

Every cluster gets a network of its own and every workload a network namespace (its pod) on it; the east-west
gateways also sit on a shared "public" network. Addresses come from one /12 of 10.0.0.0/8, the run's *slot*
(``10.<16*slot>.0.0/12``; :mod:`meshfed.netns` picks a slot no route or address of the root namespace overlaps,
so two runs, or a host network in 10/8, never collide)::

    public   10.<b>.0.0/24        bridge mf<id>pub: root .1, gateway of cluster i .<10+i>
    cluster  10.<b+1+i>.0.0/16    bridge mf<id>b<i>: root .0.1, the cluster's gateway .0.2, pods .1.1, .1.2, ...
    VIPs     10.<b+15>.0.0/16     ClusterSetIPs, allocated from its lower /17 (never on a pod's interface: the pods'
                                  capture rules redirect them); the root holds .255.254/16 of it on the public
                                  bridge, so a ClusterSetIP dialled from the root namespace stays on our bridge

where ``b = 16 * slot``. A pod has its own /16 on-link and routes to the public network and the VIP range via
its cluster's gateway, and nothing else: no default route, so a packet to another cluster's pod has no route.
The gateway namespace forwards (and masquerades) from its cluster to the public network only. The root namespace
holds ``.0.1`` on each cluster's bridge, where the cluster's control plane (xDS) and DNS listen, and ``.1`` on the
public bridge (gateways do not forward to it); it never forwards (its ``ip_forward`` is left as it is). Every
address of the slot the root namespace could dial is on one of our bridges: nothing of it leaves the machine.

Names are ours and unique to the run (``<id>`` is random per run): namespaces ``mf-<id>-<workload>``, links
``mf<id>...`` (at most 15 characters, the kernel's limit). :func:`is_ours` is what teardown checks before it
deletes anything.

Exception tree (this module)::

    NetPlanError     the clusterset does not fit a plan (too many clusters or pods, a name too long)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "mf"  # every namespace is "mf-<id>-...", every link "mf<id>..."
MAX_CLUSTERS = 14  # /16s b+1 .. b+14 of the slot
MAX_PODS = 250 * 250
SLOTS = 16
PROXY_UID = 1337
POD_IF = "eth0"  # inside every pod
GW_CLUSTER_IF = "eth0"  # gateway namespace: leg on its cluster's bridge
GW_PUBLIC_IF = "eth1"  # gateway namespace: leg on the public bridge
ADMIN_PORT = 15000  # every Envoy's admin in its namespace (reachable from the root's bridge address only)
GATEWAY_PORT = 15443
DNS_PORT = 53  # resolv.conf cannot name a port
RUN_ID = re.compile(r"^[0-9a-f]{4}$")
IFNAMSIZ = 15


class NetPlanError(ValueError):
    """The clusterset does not fit a netns plan; the message says which limit."""


@dataclass(frozen=True, slots=True)
class PodNet:
    """One workload's namespace: its address on the cluster's bridge and the host end of its veth."""

    workload: str
    cluster: str
    netns: str
    ip: str
    prefix_len: int
    host_if: str
    bridge: str
    root_ip: str  # the root namespace's address on the bridge: control plane, DNS
    gateway_ip: str  # the cluster gateway's address on the bridge: the way to the public network

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefix_len}"


@dataclass(frozen=True, slots=True)
class GatewayNet:
    """A cluster's east-west gateway namespace: a leg on the cluster's bridge and one on the public bridge."""

    cluster: str
    netns: str
    cluster_ip: str
    public_ip: str
    cluster_host_if: str
    public_host_if: str


@dataclass(frozen=True, slots=True)
class ClusterNet:
    cluster: str
    index: int
    cidr: str
    bridge: str
    root_ip: str
    gateway: GatewayNet


@dataclass(frozen=True, slots=True)
class NetPlan:
    run_id: str
    slot: int
    public_cidr: str
    public_bridge: str
    public_root_ip: str
    vip_cidr: str
    clusters: tuple[ClusterNet, ...]
    pods: tuple[PodNet, ...]
    vip_alloc_cidr: str = ""  # where the federation allocates ClusterSetIPs (inside vip_cidr)
    vip_root_ip: str = ""  # the root's address in vip_cidr, on the public bridge

    @property
    def slot_cidr(self) -> str:
        return f"10.{SLOTS * self.slot}.0.0/12"

    def cluster(self, name: str) -> ClusterNet:
        for c in self.clusters:
            if c.cluster == name:
                return c
        raise KeyError(name)

    def pod(self, workload: str) -> PodNet:
        for p in self.pods:
            if p.workload == workload:
                return p
        raise KeyError(workload)

    def namespaces(self) -> list[str]:
        return [c.gateway.netns for c in self.clusters] + [p.netns for p in self.pods]

    def bridges(self) -> list[str]:
        return [self.public_bridge, *(c.bridge for c in self.clusters)]


def netns_name(run_id: str, what: str) -> str:
    return f"{PREFIX}-{run_id}-{what}"


def link_name(run_id: str, what: str) -> str:
    name = f"{PREFIX}{run_id}{what}"
    if len(name) > IFNAMSIZ:
        raise NetPlanError(f"link name {name!r} is longer than {IFNAMSIZ} characters")
    return name


def is_ours(name: str, run_id: str) -> bool:
    """Whether a namespace or link name belongs to run ``run_id`` (what teardown may delete)."""
    return bool(RUN_ID.match(run_id)) and (name.startswith(f"{PREFIX}-{run_id}-") or
                                            (name.startswith(f"{PREFIX}{run_id}") and len(name) <= IFNAMSIZ))


def slot_network(slot: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"10.{SLOTS * slot}.0.0/12")


def free_slot(taken: Sequence[str]) -> int | None:
    """The first slot whose /12 overlaps none of ``taken`` (the root namespace's routes and addresses, as CIDRs or
    bare addresses; ``default`` and unparsable entries are ignored), or None when every slot is taken."""
    nets: list[ipaddress.IPv4Network] = []
    for text in taken:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen > 0:
            nets.append(net)
    for slot in range(SLOTS):
        mine = slot_network(slot)
        if not any(mine.overlaps(n) for n in nets):
            return slot
    return None


def plan_network(run_id: str, slot: int, clusters: Sequence[str], workloads: Sequence[tuple[str, str]]) -> NetPlan:
    """The plan for ``clusters`` (in clusterset order) and ``workloads`` (``(cluster, workload name)``, each name
    unique in the run), in slot ``slot`` with names carrying ``run_id`` (4 hex digits)."""
    if not RUN_ID.match(run_id):
        raise NetPlanError(f"run id {run_id!r} is not 4 hex digits")
    if not 0 <= slot < SLOTS:
        raise NetPlanError(f"slot {slot} is not in 0..{SLOTS - 1}")
    if len(clusters) > MAX_CLUSTERS:
        raise NetPlanError(f"{len(clusters)} clusters: a netns run holds at most {MAX_CLUSTERS}")
    if len(workloads) > MAX_PODS:
        raise NetPlanError(f"{len(workloads)} workloads: a netns run holds at most {MAX_PODS}")
    names = [w for _, w in workloads]
    if len(set(names)) != len(names):
        raise NetPlanError("workload names must be unique in a run")
    base = SLOTS * slot
    nets: list[ClusterNet] = []
    for i, cluster in enumerate(clusters):
        octet = base + 1 + i
        gw = GatewayNet(cluster=cluster, netns=netns_name(run_id, f"gw-{cluster}"), cluster_ip=f"10.{octet}.0.2",
                        public_ip=f"10.{base}.0.{10 + i}", cluster_host_if=link_name(run_id, f"g{i}"),
                        public_host_if=link_name(run_id, f"p{i}"))
        nets.append(ClusterNet(cluster=cluster, index=i, cidr=f"10.{octet}.0.0/16",
                               bridge=link_name(run_id, f"b{i}"), root_ip=f"10.{octet}.0.1", gateway=gw))
    by_name = {c.cluster: c for c in nets}
    pods: list[PodNet] = []
    count: dict[str, int] = {}
    for k, (cluster, workload) in enumerate(workloads):
        if cluster not in by_name:
            raise NetPlanError(f"workload {workload}: no cluster {cluster!r} in the plan")
        c = by_name[cluster]
        n = count.get(cluster, 0)
        count[cluster] = n + 1
        third, fourth = 1 + n // 250, 1 + n % 250
        pods.append(PodNet(workload=workload, cluster=cluster, netns=netns_name(run_id, workload),
                           ip=f"10.{base + 1 + c.index}.{third}.{fourth}", prefix_len=16,
                           host_if=link_name(run_id, f"v{k}"), bridge=c.bridge, root_ip=c.root_ip,
                           gateway_ip=c.gateway.cluster_ip))
    return NetPlan(run_id=run_id, slot=slot, public_cidr=f"10.{base}.0.0/24",
                   public_bridge=link_name(run_id, "pub"), public_root_ip=f"10.{base}.0.1",
                   vip_cidr=f"10.{base + 15}.0.0/16", clusters=tuple(nets), pods=tuple(pods),
                   vip_alloc_cidr=f"10.{base + 15}.0.0/17", vip_root_ip=f"10.{base + 15}.255.254")


# ---- what goes inside the namespaces (text for iptables-restore, resolv.conf) ----------------------------------


def resolv_conf(pod: PodNet) -> str:
    """``/etc/netns/<pod>/resolv.conf``: the cluster's meshfed DNS on the root's bridge address."""
    return f"# written by meshfed up --network netns for {pod.workload}\nnameserver {pod.root_ip}\n" \
           "search svc.clusterset.local\noptions ndots:1 timeout:2 attempts:2\n"


def pod_filter_rules(pod: PodNet) -> str:
    """``iptables-restore --noflush`` input for a pod's ``filter`` table: the sidecar's admin (15000) and outbound
    (15001) ports take connections from the pod's own loopback and from the root's bridge address (admin only),
    never from other pods."""
    return "\n".join([
        "*filter",
        f"-A INPUT -i {POD_IF} -p tcp -s {pod.root_ip} --dport {ADMIN_PORT} -j ACCEPT",
        f"-A INPUT -i {POD_IF} -p tcp -m multiport --dports {ADMIN_PORT},15001 -j DROP",
        "COMMIT", ""])


def gateway_rules(plan: NetPlan, c: ClusterNet) -> str:
    """``iptables-restore --noflush`` input for a gateway namespace: its cluster's pods reach the public network
    (masqueraded behind the gateway's public address), nothing is forwarded the other way but replies, and its
    admin port answers the root's bridge address only."""
    return "\n".join([
        "*nat",
        f"-A POSTROUTING -s {c.cidr} -o {GW_PUBLIC_IF} -j MASQUERADE",
        "COMMIT",
        "*filter",
        ":FORWARD DROP [0:0]",
        f"-A FORWARD -d {plan.public_root_ip}/32 -j DROP",
        f"-A FORWARD -i {GW_CLUSTER_IF} -o {GW_PUBLIC_IF} -s {c.cidr} -d {plan.public_cidr} -j ACCEPT",
        f"-A FORWARD -i {GW_PUBLIC_IF} -o {GW_CLUSTER_IF} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A INPUT -p tcp -s {c.root_ip} --dport {ADMIN_PORT} -j ACCEPT",
        f"-A INPUT ! -i lo -p tcp --dport {ADMIN_PORT} -j DROP",
        "COMMIT", ""])


def partition_rules(c: ClusterNet, peers: Sequence[str] = (), *, new_chain: bool = True) -> str:
    """``iptables-restore --noflush`` input for a partition of cluster ``c``: its gateway namespace drops every
    packet on its public leg (in and out, forwarded or its own), or with ``peers`` (other gateways' public
    addresses) only what goes to or comes from them. ``new_chain``: also create the chain and the jumps to it
    (False when adding peers to a partition already in place)."""
    lines = ["*filter"]
    if new_chain:
        lines += [":MESHFED_PARTITION - [0:0]", "-I INPUT 1 -j MESHFED_PARTITION", "-I OUTPUT 1 -j MESHFED_PARTITION",
                  "-I FORWARD 1 -j MESHFED_PARTITION"]
    if peers:
        for peer in peers:
            lines += [f"-A MESHFED_PARTITION -i {GW_PUBLIC_IF} -s {peer}/32 -j DROP",
                      f"-A MESHFED_PARTITION -o {GW_PUBLIC_IF} -d {peer}/32 -j DROP"]
    else:
        lines += [f"-A MESHFED_PARTITION -i {GW_PUBLIC_IF} -j DROP", f"-A MESHFED_PARTITION -o {GW_PUBLIC_IF} -j DROP"]
    return "\n".join([*lines, "COMMIT", ""])


def heal_rules() -> str:
    return "\n".join([
        "*filter",
        "-D INPUT -j MESHFED_PARTITION",
        "-D OUTPUT -j MESHFED_PARTITION",
        "-D FORWARD -j MESHFED_PARTITION",
        "-F MESHFED_PARTITION",
        "-X MESHFED_PARTITION",
        "COMMIT", ""])


