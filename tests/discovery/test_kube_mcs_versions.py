"""Both MCS API versions against the Kubernetes API double in strict mode (custom resources served only as their
CRDs define them): with the CRDs ``meshfed install`` renders (v1beta1 stored, v1alpha1 served too) a ServiceExport
is written and read at v1beta1, its ``spec.exportedLabels`` included; on a cluster whose CRD serves only v1alpha1
it is written at v1alpha1 and the source falls back to reading v1alpha1."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from discovery.kube import (
    KubeSource,
    create_service_export_sync,
    delete_service_export_sync,
    get_service_export_sync,
    load_api_client,
    served_mcs_version_sync,
)
from discovery.model import ServiceKey
from meshfed.install.crds import CRDS
from tests.discovery.test_kube import service, until
from tests.support.kubeapi import KubeApiDouble

KEY = ServiceKey.parse("a.default")


def _alpha_only(crd: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(crd)
    [alpha] = [v for v in out["spec"]["versions"] if v["name"] == "v1alpha1"]
    out["spec"]["versions"] = [dict(alpha, storage=True)]
    return out


@pytest.fixture(params=["both", "v1alpha1-only"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[KubeApiDouble, Path, str]]:
    with KubeApiDouble(strict=True) as api:
        for crd in CRDS:
            api.put_object(crd if request.param == "both" else _alpha_only(crd))
        api.put_object(service("a"))
        yield api, api.write_kubeconfig(tmp_path / "kubeconfig", context="east"), request.param


async def test_export_is_written_and_read_at_the_served_version(cluster: tuple[KubeApiDouble, Path, str]) -> None:
    api, kubeconfig, kind = cluster
    want = "v1beta1" if kind == "both" else "v1alpha1"
    client = load_api_client(kubeconfig=kubeconfig, context="east")
    assert served_mcs_version_sync(client) == want
    assert create_service_export_sync(client, KEY)
    [obj] = api.objects(f"multicluster.x-k8s.io/{want}", "ServiceExport")
    assert obj["apiVersion"] == f"multicluster.x-k8s.io/{want}"
    got = get_service_export_sync(client, KEY)
    assert got is not None and got["metadata"]["name"] == "a"
    if kind == "both":  # the v1beta1 spec, as a user would write it
        api.put_object({**obj, "spec": {"exportedLabels": {"tier": "gold"}}})
    src = await KubeSource.from_kubeconfig(cluster="east", kubeconfig=kubeconfig, context="east",
                                           backoff_base=0.05, backoff_cap=0.2)
    async with src:
        result = await until(src.watch(), lambda r: KEY in r.snapshot.exports)
        assert src.reflectors["ServiceExport"].version == want
        export = result.snapshot.exports[KEY]
        assert export.exported_labels == ((("tier", "gold"),) if kind == "both" else ())
    assert delete_service_export_sync(client, KEY)
    assert api.objects(f"multicluster.x-k8s.io/{want}", "ServiceExport") == []
