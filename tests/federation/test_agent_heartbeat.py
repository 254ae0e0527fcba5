"""The agent's heartbeat interval: the configured interval, shortened to a third of the lease TTL the service
actually granted (a service may grant a shorter lease than the clusterset asks for)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from discovery.model import ClusterId
from federation.agent import AgentConfig, heartbeat_interval
from federation.service import ServiceConfig, state_of
from federation.store.memory import MemoryStore
from tests.federation.fedkit import Pki, agent, in_process

pytestmark = pytest.mark.timeout(120)


def test_heartbeat_interval_is_the_shorter_of_configured_and_a_third_of_the_lease() -> None:
    assert heartbeat_interval(None, 30.0) == 10.0  # nothing configured: a third of the lease
    assert heartbeat_interval(2.0, 30.0) == 2.0  # configured and shorter: as configured
    assert heartbeat_interval(5.0, 3.0) == 1.0  # configured longer than a third of a short lease: the third
    assert heartbeat_interval(5.0, 15.0) == 5.0  # exactly a third: either
    assert heartbeat_interval(0.0, 9.0) == 3.0  # zero means not configured
    assert heartbeat_interval(None, 0.0) == 0.05  # never a busy loop
    assert heartbeat_interval(0.001, 30.0) == 0.05


async def test_long_configured_interval_still_renews_a_short_granted_lease(tmp_path: Path) -> None:
    # The agent asks for a heartbeat every minute; the service grants 1.5 s leases. The agent must renew within
    # the lease anyway: its member's renewal time moves on several times (with a one-minute interval it would not
    # move at all within the bound below).
    pki = Pki.create()
    store = MemoryStore(reap_interval_s=0.2)
    config = ServiceConfig(lease_ttl_s=1.5, bookmark_interval_s=0.5)
    async with in_process(pki, store, config=config) as (url, app), \
            agent(pki, "east", url, config=AgentConfig(heartbeat_interval_s=60.0, backoff_initial_s=0.05,
                                                       backoff_max_s=0.5)) as east:
        async with asyncio.timeout(20):
            await east.registered.wait()
        seen: set[object] = set()
        async with asyncio.timeout(30):
            while len(seen) < 4:  # the registration and three heartbeats (renewals are not catalog events)
                snap = await store.snapshot()
                seen.update(m.renewed_at for m in snap.members if m.info.id == ClusterId("east"))
                await asyncio.sleep(0.05)
        assert state_of(app).members()[ClusterId("east")].lease_ttl_s == 1.5
        assert east.registered.is_set()


async def test_a_refused_heartbeat_is_reported_at_once_and_cleared_by_the_next_success() -> None:
    """Issue 18: heartbeats refused with 401 (a chain no root of the bundle accepts) went unnoticed until the lease
    ran out. The agent keeps the last heartbeat error (what the control plane's /status and `meshfed status`
    show) from the first failure on, and clears it when a heartbeat is accepted again."""
    from collections.abc import Sequence

    from federation.service import create_app, serve
    from federation.trust.errors import ChainError
    from federation.trust.identity import cluster_of_peer
    from tests.federation.fedkit import eventually
    from tests.support.procs import free_port

    pki = Pki.create()
    refuse = False

    def identify(chain: Sequence[bytes]) -> ClusterId:
        if refuse:
            raise ChainError("intermediate 'east' does not chain to any root of the bundle")
        return cluster_of_peer(chain, pki.bundle)

    app = create_app(store=MemoryStore(), bundle=lambda: pki.bundle, identify=identify,
                     config=ServiceConfig(lease_ttl_s=30.0, bookmark_interval_s=0.5))
    port = free_port()
    async with serve(app, host="127.0.0.1", port=port, ssl_context=pki.server_ssl(), shutdown_timeout=0.5), \
            agent(pki, "east", f"https://127.0.0.1:{port}",
                  config=AgentConfig(heartbeat_interval_s=0.1, backoff_initial_s=0.05, backoff_max_s=0.2)) as east:
        await eventually(lambda: east.heartbeat_ok_at is not None, within=20, what="a first accepted heartbeat")
        assert east.heartbeat_error == "" and east.heartbeat_failing_since is None
        refuse = True
        await eventually(lambda: bool(east.heartbeat_error), within=20, what="the refusal reported")
        assert "401" in east.heartbeat_error and "does not chain" in east.heartbeat_error
        assert east.heartbeat_failing_since is not None
        refuse = False
        await eventually(lambda: not east.heartbeat_error, within=20, what="the error cleared")
        assert east.heartbeat_failing_since is None
