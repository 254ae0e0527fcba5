"""Test helpers for the ADS tests: a small grpc.aio xDS client over the real generated stubs, and resources."""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from gateway.snapshot import CLUSTER, ENDPOINT, Snapshot

READ_TIMEOUT = 10.0
_Response = TypeVar("_Response")


def node(node_id: str, **metadata: str) -> base_pb2.Node:
    metadata = {"SERVICE_ACCOUNT": "web", **metadata}
    md = struct_pb2.Struct()
    md.update(metadata)
    return base_pb2.Node(id=node_id, cluster="test", metadata=md)


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.connect_timeout.FromMilliseconds(500)
    return c


def cla(name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    lb = [endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=p))))
        for p in ports]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb)])


def snapshot(clusters: dict[str, tuple[int, ...]]) -> Snapshot:
    return Snapshot.build({
        CLUSTER: [eds_cluster(n) for n in clusters],
        ENDPOINT: [cla(n, *ports) for n, ports in clusters.items()],
    })


def names_of(response: Any) -> list[str]:
    """Resource names in a SotW or delta response."""
    out = []
    for r in response.resources:
        packed = r.resource if hasattr(r, "resource") else r
        if packed.type_url == ENDPOINT:
            out.append(endpoint_pb2.ClusterLoadAssignment.FromString(packed.value).cluster_name)
        else:
            out.append(cluster_pb2.Cluster.FromString(packed.value).name)
    return sorted(out)


class _Client(Generic[_Response]):
    """What both ADS variants share: the node on the first request, NACKs as ``error_detail``, bounded reads."""

    def __init__(self, call: Any, node_id: str, **metadata: str) -> None:
        self.call = call
        self.node = node(node_id, **metadata)
        self.first = True

    async def _send(self, req: Any, error: str | None) -> None:
        if self.first:
            req.node.CopyFrom(self.node)
            self.first = False
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(req)

    async def recv(self) -> _Response:
        resp = await asyncio.wait_for(self.call.read(), READ_TIMEOUT)
        assert resp is not grpc.aio.EOF, "stream ended"
        return resp  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self.call.done_writing()
        self.call.cancel()


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class SotwClient(_Client[discovery_pb2.DiscoveryResponse]):
    """One StreamAggregatedResources call; ``request`` writes, ``recv`` reads with a bounded wait."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str, token: str | None, **metadata: str) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        super().__init__(stub.StreamAggregatedResources(metadata=_metadata(token)), node_id, **metadata)

    async def request(self, type_url: str, names: list[str] | None = None, *, version: str = "", nonce: str = "",
                      error: str | None = None) -> None:
        await self._send(discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names or [],
                                                        version_info=version, response_nonce=nonce), error)

    async def ack(self, resp: discovery_pb2.DiscoveryResponse, names: list[str] | None = None) -> None:
        await self.request(resp.type_url, names, version=resp.version_info, nonce=resp.nonce)


class DeltaClient(_Client[discovery_pb2.DeltaDiscoveryResponse]):
    def __init__(self, channel: grpc.aio.Channel, node_id: str, token: str | None) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        super().__init__(stub.DeltaAggregatedResources(metadata=_metadata(token)), node_id)

    async def request(self, type_url: str, *, subscribe: list[str] | None = None,
                      unsubscribe: list[str] | None = None, nonce: str = "", error: str | None = None,
                      initial: dict[str, str] | None = None) -> None:
        await self._send(discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=subscribe or [], resource_names_unsubscribe=unsubscribe or [],
            response_nonce=nonce, initial_resource_versions=initial or {}), error)

    async def ack(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> None:
        await self.request(resp.type_url, nonce=resp.nonce)
