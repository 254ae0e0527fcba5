"""The response fields an ``Entry`` frames once for every stream parse as the messages protobuf itself builds."""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from gateway.snapshot import ENDPOINT, make_entry, wire_field


def _assignment(name: str, hosts: int) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for i in range(hosts):
        sock = cla.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
        sock.address, sock.port_value = f"10.0.{i // 250}.{i % 250}", 9080
    return cla


def test_delta_and_sotw_fields_equal_protobufs_own_messages() -> None:
    # 300 hosts: a resource longer than 127 bytes, so lengths take several varint bytes
    entries = [make_entry(ENDPOINT, f"outbound|9080||s{i}.default", _assignment(f"outbound|9080||s{i}.default", n))
               for i, n in enumerate((0, 1, 300))]
    delta = discovery_pb2.DeltaDiscoveryResponse.FromString(
        wire_field(1, b"v7") + b"".join(e.delta_field for e in entries) + wire_field(4, ENDPOINT.encode())
        + wire_field(5, b"n1") + wire_field(6, b"gone"))
    assert delta == discovery_pb2.DeltaDiscoveryResponse(
        system_version_info="v7", type_url=ENDPOINT, nonce="n1", removed_resources=["gone"],
        resources=[discovery_pb2.Resource(name=e.name, version=e.version, resource=e.packed) for e in entries])
    sotw = discovery_pb2.DiscoveryResponse.FromString(b"".join(e.sotw_field for e in entries))
    assert list(sotw.resources) == [e.packed for e in entries]
    assert [sotw.resources[i].value for i in range(3)] == [e.data for e in entries]
    assert entries[2].message == _assignment("outbound|9080||s2.default", 300)  # parsed back from the bytes
