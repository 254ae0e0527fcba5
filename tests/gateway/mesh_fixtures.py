"""Hand-built two-cluster meshes (east and west) and test certificates for the generator and end-to-end tests."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from discovery.authz import AuthorizationPolicy
from discovery.convert import convert
from discovery.model import (
    ClusterId,
    ClusterInfo,
    Endpoint,
    Locality,
    LocalitySummary,
    NetworkId,
    Registry,
    RemoteEndpoints,
    Service,
    ServiceExport,
    ServiceImport,
    ServiceKey,
    ServicePort,
    ServiceType,
    namespace,
)
from federation.trust.ca import IntermediateCA, create_intermediate, create_root, issue_workload
from federation.trust.spiffe import SpiffeId, TrustDomain
from gateway.context import InboundPort, ProxyInfo, ProxyKind, PushContext, WorkloadCert
from tests.gateway.envoy_fixtures import ControlPlane, EnvoyProc, start_envoy, wait_ready
from tests.support.procs import free_port
from tests.support.workloads import Handler, serve_app

TD = "meshfed.test"
EAST = ClusterId("east")
WEST = ClusterId("west")
RATINGS = ServiceKey.parse("ratings.default")
REVIEWS = ServiceKey.parse("reviews.default")
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


class MeshCA:
    """A root and one intermediate per cluster, issuing SPIFFE leaf certificates (EC P-256)."""

    def __init__(self, trust_domain: str = TD) -> None:
        self.td = trust_domain
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshfed test root")]),
                               self.root_key, None, None, ca=True)
        self.intermediates: dict[str, tuple[ec.EllipticCurvePrivateKey, x509.Certificate]] = {}

    def _cert(self, subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
              issuer_key: ec.EllipticCurvePrivateKey | None, *, ca: bool, uri: str | None = None) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(subject)
                   .issuer_name(issuer.subject if issuer else subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
                critical=True)
        else:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
                critical=True).add_extension(x509.ExtendedKeyUsage(
                    [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False)
        if uri:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                                            critical=True)
        return builder.sign(issuer_key or key, hashes.SHA256())

    def intermediate(self, cluster: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if cluster not in self.intermediates:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = self._cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshfed {cluster} CA")]),
                              key, self.root, self.root_key, ca=True)
            self.intermediates[cluster] = (key, cert)
        return self.intermediates[cluster]

    def bundle_pem(self) -> str:
        return self.root.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, cluster: str, ns: str, sa: str) -> tuple[str, WorkloadCert]:
        spiffe = f"spiffe://{self.td}/ns/{ns}/sa/{sa}"
        ikey, icert = self.intermediate(cluster)
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self._cert(x509.Name([]), key, icert, ikey, ca=False, uri=spiffe)
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, icert)).decode()
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        return spiffe, WorkloadCert(key_pem=key_pem, chain_pem=chain)


@dataclass
class Mesh:
    """Port assignments of a two-cluster loopback mesh and the registries each control plane holds."""

    east_gateway_port: int
    west_gateway_port: int
    # (cluster, service) -> list of (address, sidecar inbound port)
    pods: dict[tuple[ClusterId, ServiceKey], list[tuple[str, int]]] = field(default_factory=dict)
    service_port: int = 9080
    exports: dict[ClusterId, set[ServiceKey]] = field(default_factory=dict)
    gateway_hosts: dict[ClusterId, str] = field(default_factory=dict)  # default 127.0.0.1
    # Captured traffic: the ClusterSetIP of each import, the cluster IP of each (cluster, service), and ports other
    # than the single ``http`` one (endpoints then list the sidecar port under each port's name).
    clusterset_ips: dict[ServiceKey, str] = field(default_factory=dict)
    cluster_ips: dict[tuple[ClusterId, ServiceKey], str] = field(default_factory=dict)
    service_ports: dict[ServiceKey, tuple[ServicePort, ...]] = field(default_factory=dict)

    def clusters(self) -> dict[ClusterId, ClusterInfo]:
        return {
            EAST: ClusterInfo(id=EAST, network=NetworkId("net-east"), region="eu", zone="eu-1",
                              gateway_host=self.gateway_hosts.get(EAST, "127.0.0.1"),
                              gateway_port=self.east_gateway_port),
            WEST: ClusterInfo(id=WEST, network=NetworkId("net-west"), region="us", zone="us-1",
                              gateway_host=self.gateway_hosts.get(WEST, "127.0.0.1"),
                              gateway_port=self.west_gateway_port),
        }

    def service(self, cluster: ClusterId, key: ServiceKey) -> Service:
        info = self.clusters()[cluster]
        sa = key.name
        ports = self.service_ports.get(key, (ServicePort(port=self.service_port, name="http"),))
        eps = tuple(Endpoint(address=addr, zone=info.zone, ports=tuple((p.name, port) for p in ports),
                             service_account=sa)
                    for addr, port in self.pods.get((cluster, key), []))
        return Service(cluster=cluster, key=key, ports=ports, endpoints=eps,
                       cluster_ip=self.cluster_ips.get((cluster, key), ""))

    def registry(self, local: ClusterId) -> Registry:
        """What ``local``'s control plane knows: its own shard, the other's exports as remote summaries."""
        infos = self.clusters()
        local_services = [self.service(local, k) for (c, k) in sorted(self.pods) if c == local]
        exports = [ServiceExport(cluster=local, key=k, created=T0) for k in sorted(self.exports.get(local, set()))]
        reg = Registry(local=local).with_shard(local, local_services, exports)
        imports: dict[ServiceKey, ServiceImport] = {}
        for cluster in (EAST, WEST):
            for key in sorted(self.exports.get(cluster, set())):
                svc = self.service(cluster, key)
                prev = imports.get(key)
                ips = (self.clusterset_ips[key],) if key in self.clusterset_ips else ()
                imports[key] = ServiceImport(key=key, type=ServiceType.CLUSTER_SET_IP, ports=svc.ports,
                                             clusters=(*(prev.clusters if prev else ()), cluster), ips=ips)
            if cluster == local:
                continue
            info = infos[cluster]
            entries = []
            for key in sorted(self.exports.get(cluster, set())):
                svc = self.service(cluster, key)
                ready = len(svc.ready_endpoints)
                entries.append((key, RemoteEndpoints(
                    cluster=cluster, network=info.network, gateway_host=info.gateway_host,
                    gateway_port=info.gateway_port,
                    localities=(LocalitySummary(locality=Locality(region=info.region, zone=info.zone,
                                                                  cluster=cluster, network=info.network),
                                                ready=ready, weight=ready),),
                )))
            reg = reg.with_remote(cluster, entries)
        return reg.with_catalog(clusters=infos, imports=imports)

    def context(self, local: ClusterId, ca: MeshCA, certs: dict[str, WorkloadCert]) -> PushContext:
        return PushContext(registry=self.registry(local), trust_domain=ca.td, trust_bundle_pem=ca.bundle_pem(),
                           workload_certs=certs)

    def sidecar(self, cluster: ClusterId, service_account: str, *, pod: str, outbound_port: int,
                services: tuple[ServiceKey, ...] = (), inbound: tuple[InboundPort, ...] = ()) -> ProxyInfo:
        """A workload's Envoy sidecar in namespace ``default`` of ``cluster``, its node named after ``pod``."""
        return ProxyInfo(kind=ProxyKind.SIDECAR, cluster=cluster, namespace=namespace("default"),
                         service_account=service_account,
                         node_id=f"sidecar~127.0.0.1~{pod}.default~default.svc.cluster.local",
                         services=services, inbound=inbound, outbound_port=outbound_port)

    def gateway(self, cluster: ClusterId) -> ProxyInfo:
        """``cluster``'s east-west gateway Envoy, listening on this mesh's gateway port for it."""
        port = self.east_gateway_port if cluster == EAST else self.west_gateway_port
        return ProxyInfo(kind=ProxyKind.GATEWAY, cluster=cluster, namespace=namespace("meshfed"),
                         service_account="eastwest", gateway_port=port,
                         node_id=f"router~127.0.0.1~eastwest-{cluster}.meshfed~meshfed.svc.cluster.local")


def cluster_cas(trust_domain: str = TD) -> tuple[dict[str, IntermediateCA], str]:
    """A fresh root (through the real CA code) and one intermediate for east and west; with the bundle PEM."""
    td = TrustDomain(trust_domain)
    root = create_root(td)
    cas = {c: create_intermediate(root, SpiffeId.cluster(td, c)) for c in ("east", "west")}
    return cas, root.cert_pem.decode()


def authorization_policies(text: str, cluster: ClusterId) -> tuple[AuthorizationPolicy, ...]:
    """The AuthorizationPolicies of a multi-document YAML text, through the real converter, as ``cluster`` holds
    them."""
    out = []
    for doc in yaml.safe_load_all(text):
        converted = convert(doc, cluster=cluster)
        assert isinstance(converted, AuthorizationPolicy)
        out.append(converted)
    return tuple(out)


def workload_certs(cas: dict[str, IntermediateCA], cluster: str, identities: list[tuple[str, str]]
                   ) -> dict[str, WorkloadCert]:
    """Workload certificates from ``cluster``'s intermediate, keyed by SPIFFE ID, one per (namespace, sa)."""
    td = TrustDomain(TD)
    out = {}
    for ns, sa in identities:
        sid = SpiffeId.workload(td, ns, sa)
        key, chain = issue_workload(cas[cluster], sid, ttl=datetime.timedelta(hours=1))
        out[str(sid)] = WorkloadCert(key_pem=key.decode(), chain_pem=b"".join(chain).decode())
    return out



def hand_made_leaf(ca: IntermediateCA, spiffe: str, *, subject: x509.Name) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) of a workload-shaped leaf signed by ``ca`` with whatever SAN and Subject the test
    wants, bypassing ``sign_csr``'s checks: what a compromised (or foreign) CA key could mint."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ca.key
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem, key_pem


def subject(td: str, cluster: str) -> x509.Name:
    """The Subject a cluster's intermediate permits (``O=<trust domain>, OU=<cluster>``)."""
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, td),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster)])


@contextlib.asynccontextmanager
async def ratings_sidecar(tmp: Path, mesh: Mesh, ctx: PushContext, handler: Handler
                          ) -> AsyncIterator[tuple[ControlPlane, EnvoyProc, int]]:
    """West's ratings sidecar on a real Envoy, fed ``ctx`` over ADS, in front of ``handler`` (the app); yields
    (control plane, Envoy, inbound port) and stops Envoy and the app afterwards, also after a failure."""
    ports = {n: free_port() for n in ("in", "app")}
    mesh.pods[(WEST, RATINGS)] = [("127.0.0.1", ports["in"])]
    ctx = replace(ctx, registry=mesh.registry(WEST))
    runner = await serve_app(ports["app"], handler)
    envoy: EnvoyProc | None = None
    try:
        async with ControlPlane(ctx=ctx) as cp:
            proxy = mesh.sidecar(WEST, "ratings", pod="ratings-1", services=(RATINGS,),
                                 inbound=(InboundPort(ports["in"], ports["app"]),), outbound_port=free_port())
            envoy = start_envoy(tmp, cp, proxy)
            await wait_ready(envoy)
            yield cp, envoy, ports["in"]
    finally:
        if envoy is not None:
            envoy.stop()
        await runner.cleanup()
