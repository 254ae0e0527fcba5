"""Where a control plane's own cluster comes from: the manifest files of a clusterset (local runs), or the
Kubernetes API. With the API, xDS clients may also be authenticated by it (TokenReview of their projected
service-account tokens), with the control plane's own credential for that API. Before anything else the
cluster's KEP-2149 ClusterProperties (where it has them) are checked against the clusterset definition."""

from __future__ import annotations

import asyncio
import ssl
from contextlib import AsyncExitStack
from pathlib import Path

from discovery.clusterid import check_identity
from discovery.kube import KubeSource, load_api_client, read_cluster_properties_sync
from discovery.manifests import ManifestSource
from discovery.source import ClusterSource
from gateway.auth import Authenticator, TokenReviewAuthenticator
from meshfed.controlplane.config import ControlPlaneConfig

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


async def open_source(config: ControlPlaneConfig, manifests: ManifestSource,
                      stack: AsyncExitStack) -> tuple[ClusterSource, Authenticator | None]:
    """The source ``config`` names (``manifests`` is returned as it is; a Kubernetes source is entered on
    ``stack``), and the TokenReview authenticator when ``config.xds_auth`` asks for one (else None)."""
    cfg = config
    if cfg.source == "manifests":
        return manifests, None
    api = await asyncio.to_thread(load_api_client, kubeconfig=cfg.kubeconfig, context=cfg.kube_context,
                                  in_cluster=cfg.in_cluster)
    stack.callback(api.close)
    # KEP-2149: where the cluster states its id (and clusterset), it must be the one this control plane runs as.
    check_identity(await asyncio.to_thread(read_cluster_properties_sync, api), cluster=cfg.cluster,
                   clusterset=cfg.clusterset.name)
    auth: Authenticator | None = None
    if cfg.xds_auth == "tokenreview":
        conf = api.configuration
        def credential() -> str:
            """The current bearer token: in a pod, the projected token file kubelet keeps rotating."""
            if cfg.in_cluster and SERVICE_ACCOUNT_TOKEN.exists():
                return SERVICE_ACCOUNT_TOKEN.read_text().strip()
            bearer = conf.auth_settings().get("BearerToken", {})
            return str(bearer.get("value", "")).removeprefix("Bearer ").strip()

        ssl_ctx: ssl.SSLContext | bool = False
        if conf.verify_ssl and conf.ssl_ca_cert:
            ssl_ctx = ssl.create_default_context(cafile=conf.ssl_ca_cert)
        elif conf.verify_ssl:
            ssl_ctx = True
        auth = TokenReviewAuthenticator(api_url=conf.host, credential=credential, audience=cfg.token_audience,
                                        cluster=str(cfg.cluster), ssl_context=ssl_ctx)
    source = await stack.enter_async_context(KubeSource(api=api, cluster=cfg.cluster))
    return source, auth
