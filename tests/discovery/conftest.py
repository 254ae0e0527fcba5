"""Fixtures shared by the Kubernetes source tests: the API server double, a kubeconfig naming it, and a
KubeSource on it (its reflector threads must all be gone once it closes)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from discovery.kube import KubeSource
from tests.support.kubeapi import KubeApiDouble


@pytest.fixture
def api() -> Iterator[KubeApiDouble]:
    with KubeApiDouble() as double:
        yield double


@pytest.fixture
def kubeconfig(api: KubeApiDouble, tmp_path: Path) -> Path:
    return api.write_kubeconfig(tmp_path / "kubeconfig", context="east")


@pytest.fixture
async def source(kubeconfig: Path) -> AsyncIterator[KubeSource]:
    src = await KubeSource.from_kubeconfig(cluster="east", kubeconfig=kubeconfig, context="east",
                                           backoff_base=0.05, backoff_cap=0.5, watch_timeout=60)
    async with src:
        yield src
    assert not any(t.name.startswith("meshfed-kube-east") for t in threading.enumerate())
