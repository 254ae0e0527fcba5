"""The xDS type URLs are written once (gateway.snapshot), with one table of short names (gateway.xdstypes): both
checked against the protobuf messages they name."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from gateway import generators as g
from gateway import snapshot
from gateway.generators.common import type_url
from gateway.xdstypes import SHORT_NAMES, short_name


def test_type_urls_name_the_messages_and_the_generators_serve_exactly_those() -> None:
    assert snapshot.CLUSTER == type_url(cluster_pb2.Cluster) == g.CLUSTER_TYPE
    assert snapshot.ENDPOINT == type_url(endpoint_pb2.ClusterLoadAssignment) == g.ENDPOINT_TYPE
    assert snapshot.LISTENER == type_url(listener_pb2.Listener) == g.LISTENER_TYPE
    assert snapshot.ROUTE == type_url(route_pb2.RouteConfiguration) == g.ROUTE_TYPE
    assert snapshot.SECRET == type_url(secret_pb2.Secret) == g.SECRET_TYPE
    assert set(g.GENERATORS) == set(snapshot.TYPE_ORDER) == set(SHORT_NAMES)


def test_short_names() -> None:
    assert [short_name(t) for t in snapshot.TYPE_ORDER] == ["CDS", "EDS", "LDS", "RDS", "SDS"]
    assert short_name("type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig") == "TypedExtensionConfig"
