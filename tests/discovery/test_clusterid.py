"""KEP-2149 cluster identity: the ClusterProperty objects meshfed install writes, read back through the real
``kubernetes`` client from the strict API double (absent where the CRD is not installed), and the check the
control plane makes at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from discovery.clusterid import IdentityMismatch, check_identity, identity_objects
from discovery.kube import load_api_client, read_cluster_properties_sync
from discovery.model import ClusterId
from meshfed.install.crds import ALL_CRDS
from tests.support.kubeapi import KubeApiDouble


def test_properties_are_read_where_the_cluster_has_them(tmp_path: Path) -> None:
    with KubeApiDouble(strict=True) as api:
        client = load_api_client(kubeconfig=api.write_kubeconfig(tmp_path / "kc", context="east"), context="east")
        assert read_cluster_properties_sync(client) == {}  # ClusterProperty not served at all
        for crd in ALL_CRDS:
            api.put_object(crd)
        assert read_cluster_properties_sync(client) == {}  # served, none written
        for obj in identity_objects(ClusterId("east"), "demo"):
            api.put_object(obj)
        assert read_cluster_properties_sync(client) == {"cluster.clusterset.k8s.io": "east",
                                                        "clusterset.k8s.io": "demo"}


def test_check_names_both_values() -> None:
    check_identity({}, cluster=ClusterId("east"), clusterset="demo")
    check_identity({"cluster.clusterset.k8s.io": "east", "clusterset.k8s.io": "demo"}, cluster=ClusterId("east"),
                   clusterset="demo")
    with pytest.raises(IdentityMismatch, match=r"'west'.*'east'"):
        check_identity({"cluster.clusterset.k8s.io": "west"}, cluster=ClusterId("east"), clusterset="demo")
    with pytest.raises(IdentityMismatch, match=r"'other'.*'demo'"):
        check_identity({"clusterset.k8s.io": "other"}, cluster=ClusterId("east"), clusterset="demo")
