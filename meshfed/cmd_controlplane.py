"""``meshfed controlplane``: run one cluster's control plane (discovery, federation agent, DNS, xDS, SDS)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import click

from discovery.clusterid import IdentityMismatch
from discovery.clusterset import ClusterSetError, load_clusterset
from discovery.kube import KubeError
from discovery.model import DiscoveryError, cluster_id
from federation.trust.errors import TrustError
from gateway.pipeline import tune_gc
from meshfed.controlplane import ControlPlane, ControlPlaneConfig
from meshfed.controlplane.config import parse_listen
from meshfed.output import fail


async def _serve(config: ControlPlaneConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with ControlPlane(config) as cp:
        tune_gc()  # the collector's full passes would stall the event loop serving xDS, DNS and heartbeats
        click.echo(f"control plane {config.cluster} ready: xds {config.xds.host}:{cp.ads.port if cp.ads else 0} "
                   f"dns {config.dns.host}:{cp.dns.port if cp.dns else 0} admin {config.admin.host}:{cp.admin_port}",
                   err=True)
        await stop.wait()


@click.command("controlplane")
@click.option("--clusterset", "clusterset_dir", default="clusters/demo", show_default=True,
              type=click.Path(path_type=Path), help="clusterset directory (holds clusterset.yaml) or the file itself")
@click.option("--cluster", required=True, help="this cluster's name in the clusterset")
@click.option("--ca", "ca_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="this cluster's intermediate CA directory (Istio plug-in CA layout)")
@click.option("--federation", "federation_urls", multiple=True, metavar="URL",
              help="federation service URL (repeat for replicas); none: run unfederated")
@click.option("--xds-listen", default="127.0.0.1:15010", show_default=True, metavar="HOST:PORT")
@click.option("--dns-listen", default="127.0.0.1:5353", show_default=True, metavar="HOST:PORT")
@click.option("--admin-listen", default="127.0.0.1:15014", show_default=True, metavar="HOST:PORT",
              help="/healthz, /readyz, /status, /metrics")
@click.option("--gateway-address", required=True, metavar="HOST:PORT",
              help="where other clusters reach this cluster's east-west gateway")
@click.option("--tokens", "tokens_file", type=click.Path(dir_okay=False, path_type=Path),
              help="per-workload xDS bootstrap tokens (JSON, 0600; local runs)")
@click.option("--runtime", "runtime_file", type=click.Path(dir_okay=False, path_type=Path),
              help="endpoint port overrides written by the local runner")
@click.option("--source", type=click.Choice(["manifests", "kubernetes"]), default="manifests", show_default=True,
              help="where this cluster's Services, EndpointSlices, ServiceExports and Istio policies come from")
@click.option("--kubeconfig", type=click.Path(dir_okay=False, path_type=Path),
              help="with --source kubernetes: kubeconfig file (default: in-cluster service account)")
@click.option("--context", "kube_context", help="with --source kubernetes: kubeconfig context")
@click.option("--xds-auth", type=click.Choice(["tokens", "tokenreview"]), default=None,
              help="how xDS clients authenticate (default: tokenreview with --source kubernetes, else tokens)")
@click.option("--xds-token-audience", default="meshfed", show_default=True,
              help="audience the projected service-account tokens of proxies must carry")
@click.option("--xds-mtls-listen", default=None, metavar="HOST:PORT",
              help="also serve ADS over mutual TLS here, authenticating proxyless gRPC workloads by certificate")
@click.option("--xds-mtls-host", "xds_mtls_hosts", multiple=True, metavar="NAME",
              help="IP or DNS name the mTLS ADS certificate is valid for (repeatable; default: the listen host)")
@click.option("--cert-files", "cert_files", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="certfiles.json listing directories of file-based workload certificates (proxyless gRPC) to "
                   "keep renewed from this cluster's CA, also across root rotation (local runs)")
@click.option("--webhook-listen", default=None, metavar="HOST:PORT",
              help="serve the sidecar injection webhook (HTTPS POST /inject) here")
@click.option("--webhook-host", "webhook_hosts", multiple=True, metavar="NAME",
              help="DNS name (or IP) the webhook's certificate is valid for (repeatable; default: the listen host)")
@click.option("--webhook-configuration", default="", metavar="NAME",
              help="keep this MutatingWebhookConfiguration's caBundle equal to the clusterset's roots, through root "
                   "rotations (--source kubernetes; the install passes meshfed-sidecar-injector)")
@click.option("--inject-image", default="", metavar="IMAGE", help="the image injected pods' meshfed containers run")
@click.option("--inject-image-pull-policy", type=click.Choice(["Always", "IfNotPresent", "Never"]),
              default="IfNotPresent", show_default=True)
@click.option("--inject-xds-address", default="", metavar="HOST:PORT",
              help="where injected sidecars reach this control plane's ADS (its Service name and port)")
@click.option("--inject-xds-mtls-address", default="", metavar="HOST:PORT",
              help="where proxyless gRPC pods (template grpc) reach the mutual-TLS ADS listener")
@click.option("--debounce-quiet", type=float, default=0.1, show_default=True, metavar="SECONDS")
@click.option("--debounce-max", type=float, default=1.0, show_default=True, metavar="SECONDS")
def controlplane(clusterset_dir: Path, cluster: str, ca_dir: Path, federation_urls: tuple[str, ...], xds_listen: str,
                 dns_listen: str, admin_listen: str, gateway_address: str, tokens_file: Path | None,
                 runtime_file: Path | None, source: str, kubeconfig: Path | None, kube_context: str | None,
                 xds_auth: str | None, xds_token_audience: str, xds_mtls_listen: str | None,
                 xds_mtls_hosts: tuple[str, ...], cert_files: Path | None, webhook_listen: str | None,
                 webhook_hosts: tuple[str, ...], webhook_configuration: str, inject_image: str,
                 inject_image_pull_policy: str, inject_xds_address: str, inject_xds_mtls_address: str,
                 debounce_quiet: float, debounce_max: float) -> None:
    """Run one cluster's control plane until SIGTERM or Ctrl-C."""
    try:
        cs = load_clusterset(clusterset_dir)
        cid = cluster_id(cluster)
        cs.cluster(cid)
        gateway = parse_listen(gateway_address, what="--gateway-address")
        config = ControlPlaneConfig(
            clusterset=cs, cluster=cid, ca_dir=ca_dir, federation_urls=federation_urls,
            xds=parse_listen(xds_listen, what="--xds-listen"), dns=parse_listen(dns_listen, what="--dns-listen"),
            admin=parse_listen(admin_listen, what="--admin-listen"), gateway_host=gateway.host,
            gateway_port=gateway.port, tokens_file=tokens_file, runtime_file=runtime_file,
            debounce_quiet_s=debounce_quiet, debounce_max_s=debounce_max, source=source, kubeconfig=kubeconfig,
            kube_context=kube_context, in_cluster=source == "kubernetes" and kubeconfig is None and not kube_context,
            xds_auth=xds_auth or ("tokenreview" if source == "kubernetes" else "tokens"),
            token_audience=xds_token_audience,
            xds_mtls=parse_listen(xds_mtls_listen, what="--xds-mtls-listen") if xds_mtls_listen else None,
            xds_mtls_hosts=xds_mtls_hosts, cert_files=cert_files,
            webhook=parse_listen(webhook_listen, what="--webhook-listen") if webhook_listen else None,
            webhook_hosts=webhook_hosts, webhook_configuration=webhook_configuration, inject_image=inject_image,
            inject_image_pull_policy=inject_image_pull_policy, inject_xds_address=inject_xds_address,
            inject_xds_mtls_address=inject_xds_mtls_address,
        )
        config.check()
    except (ClusterSetError, DiscoveryError, ValueError, KeyError) as exc:
        fail(str(exc), hint="check --clusterset and --cluster")
        return
    try:
        asyncio.run(_serve(config))
    except TrustError as exc:
        fail(f"{ca_dir}: {exc}", hint="create the cluster CA with 'meshfed ca intermediate'")
    except KubeError as exc:
        fail(str(exc), hint="check --kubeconfig/--context, or the pod's service account and RBAC")
    except IdentityMismatch as exc:
        fail(str(exc), hint="check --cluster and --clusterset against the cluster's ClusterProperties")
    except OSError as exc:
        fail(f"cannot start the control plane: {exc}", hint="is another process using one of the listen ports?")
