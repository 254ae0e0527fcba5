"""One cluster's control plane: discovery -> registry -> (federation agent, DNS, xDS) in one process.

The composition::

    manifest source (or Kubernetes source) --local shard--> registry <--remote shards-- federation agent
                                                               |
                          +------------------------------------+----------------------+
                          v                                    v                      v
                 DNS (clusterset.local)          push debouncer -> generators -> snapshot cache -> ADS
                                                               ^
                                         SDS: workload certificates signed by this cluster's intermediate

Watchers never call the servers: each change replaces the registry value and submits a mergeable push request;
the debouncer regenerates the snapshots of connected proxies, and the cache sends only what changed. The admin
endpoint (``/healthz``, ``/readyz``, ``/status``, ``/metrics``) is how ``meshfed status`` and ``diagnose`` see it.

The files, one job each:

- ``config``: ``ControlPlaneConfig`` and its listen addresses; reading the two files a local run (``meshfed up``)
  writes: ``tokens.json`` (per-workload bootstrap tokens, 0600) and ``runtime.json`` (the loopback ports the runner
  picked for each endpoint address, replacing the manifests' placeholder ports);
- ``localrun``: following those files while running (token table reloads, endpoint overrides);
- ``sources``: the cluster's own objects from manifest files or the Kubernetes API (and TokenReview with it);
- ``trust``: the CA directory re-read on change, the control plane's own leaves renewed;
- ``admin``: the HTTP endpoint; ``status``: what ``/status`` serves;
- ``composition``: ``ControlPlane``, which wires the rest together and keeps the registry current.

MCS rules the control plane applies live with their types: ``discovery.mcs.derive_local`` (no federation) and
``federation.catalog.with_export_conditions`` (the federation's conditions for the local exports).
"""

from federation.catalog import with_export_conditions
from meshfed.controlplane.composition import ControlPlane, run
from meshfed.controlplane.config import ControlPlaneConfig, EndpointOverride, Listen, load_runtime, load_tokens
from meshfed.controlplane.localrun import apply_runtime

__all__ = [
    "ControlPlane",
    "ControlPlaneConfig",
    "EndpointOverride",
    "Listen",
    "apply_runtime",
    "load_runtime",
    "load_tokens",
    "run",
    "with_export_conditions",
]
