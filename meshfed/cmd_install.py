"""``meshfed install``: render a clusterset's Kubernetes manifests, and apply them cluster by cluster.

Thin: parses options, calls :mod:`meshfed.install` (CA material, pure renderers, the render directory, the apply
engine), and turns its errors into clear messages through :func:`meshfed.output.fail`. Private keys go to files
(0600), never to the terminal. See ``docs/install.md``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.status import Status

from discovery.clusterset import ClusterSetError, clusterset_file, load_clusterset
from meshfed.install import InstallError
from meshfed.install.apply import ClusterClient, Outcome, apply_plan
from meshfed.install.cafiles import prepare_ca
from meshfed.install.output import PLAN, ensure_render_dir, load_plan, write_render
from meshfed.install.render import DEFAULT_ETCD_IMAGE, DEFAULT_IMAGE, InstallOptions, render_clusterset
from meshfed.output import console, fail, output_option, print_json


class RichReporter:
    """Progress on stderr: one line per object, a spinner (or, off a terminal, a line every 10 s) per wait."""

    def __init__(self, out: Console) -> None:
        self._out = out
        self._status: Status | None = None
        self._last_line: dict[str, float] = {}

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def phase(self, name: str) -> None:
        self._stop()
        self._out.print(f"[bold]phase {name}[/]")

    def applied(self, outcome: Outcome) -> None:
        style = {"created": "green", "replaced": "yellow", "unchanged": "dim", "kept": "dim"}[outcome.action]
        self._out.print(f"  {outcome.cluster:<12} [{style}]{outcome.action:<9}[/] {outcome.ref}")

    def waiting(self, cluster: str, ref: str, detail: str, elapsed: float) -> None:
        text = f"  {cluster:<12} waiting   {ref}: {detail} ({elapsed:.0f}s)"
        if self._out.is_terminal:
            if self._status is None:
                self._status = self._out.status(text)
                self._status.start()
            else:
                self._status.update(text)
        elif elapsed - self._last_line.get(ref, -10.0) >= 10.0:
            self._last_line[ref] = elapsed
            self._out.print(text)

    def ready(self, cluster: str, ref: str) -> None:
        self._stop()
        self._out.print(f"  {cluster:<12} [green]ready[/]     {ref}")


def _pairs(items: Sequence[str], option: str, form: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise click.BadParameter(f"{item!r}: expected {form}", param_hint=option)
        out[key] = value
    return out


def _contexts(mapping: Sequence[str], prefix: str, clusters: Sequence[str]) -> dict[str, str]:
    explicit = _pairs(mapping, "--context", "CLUSTER=CONTEXT")
    for cluster, ctx in explicit.items():
        if cluster not in clusters:
            raise click.BadParameter(f"'{cluster}={ctx}': no cluster {cluster!r} (clusters: {', '.join(clusters)})",
                                     param_hint="--context")
    return {c: explicit.get(c, f"{prefix}{c}") for c in clusters}


def _clients(kubeconfig: str | None, contexts: dict[str, str]) -> dict[str, ClusterClient]:
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        available, _current = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError) as exc:
        fail(f"cannot read kubeconfig {kubeconfig or '(default: $KUBECONFIG or ~/.kube/config)'}: {exc}",
             hint="give --kubeconfig FILE")
    names = {c["name"] for c in available or []}
    missing = [f"{cluster} -> {ctx}" for cluster, ctx in contexts.items() if ctx not in names]
    if missing:
        fail(f"kubeconfig has no context for: {', '.join(missing)} (contexts: {', '.join(sorted(names)) or 'none'})",
             hint="map clusters with --context CLUSTER=CONTEXT or --context-prefix PREFIX")
    out: dict[str, ClusterClient] = {}
    for cluster, ctx in contexts.items():
        try:
            api = config.new_client_from_config(config_file=kubeconfig, context=ctx)  # type: ignore[no-untyped-call]
        except (ConfigException, OSError) as exc:
            fail(f"cluster {cluster}: cannot use kubeconfig context {ctx!r}: {exc}")
        out[cluster] = ClusterClient(cluster, api)
    return out


@click.command("install")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--render", "render_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="write the manifests into DIR (DIR/<cluster>/NN-*.yaml, README.txt, plan.json)")
@click.option("--apply", "do_apply", is_flag=True,
              help="apply the manifests (SOURCE may be a render directory, to apply reviewed files as they are)")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="the meshfed image (see Dockerfile)")
@click.option("--federation-store", type=click.Choice(["sqlite", "etcd"]), default="sqlite", show_default=True,
              help="sqlite: one replica on a PersistentVolumeClaim; etcd: a 3-member etcd StatefulSet, 2 replicas")
@click.option("--federation-cluster", metavar="NAME", help="cluster running the federation service (default: first)")
@click.option("--federation-url", metavar="URL",
              help="https://HOST:8443 where the other clusters reach the federation service (its LoadBalancer)")
@click.option("--root", "root_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="the offline root CA directory (`meshfed ca init`); default: create one in DIR/ca")
@click.option("--storage-class", help="StorageClass of the federation's volumes (default: the cluster's default)")
@click.option("--storage-size", default="1Gi", show_default=True)
@click.option("--gateway-replicas", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--etcd-image", default=DEFAULT_ETCD_IMAGE, show_default=True)
@click.option("--cluster-domain", default="cluster.local", show_default=True)
@click.option("--dns-service-ip", "dns_ips", multiple=True, metavar="CLUSTER=IP",
              help="cluster IP of the control plane Service in CLUSTER (repeatable): where the cluster DNS forwards "
                   "clusterset.local (renders CLUSTER/cluster-dns/)")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig for --apply (default: $KUBECONFIG)")
@click.option("--context", "context_map", multiple=True, metavar="CLUSTER=CONTEXT",
              help="kubeconfig context of a cluster (repeatable; default: the context named like the cluster)")
@click.option("--context-prefix", default="", help="context of cluster C is PREFIX + C (e.g. kind-)")
@click.option("--cluster", "only", multiple=True, metavar="NAME", help="apply only to these clusters (repeatable)")
@click.option("--timeout", type=click.FloatRange(min=0), default=300.0, show_default=True, metavar="SECONDS",
              help="readiness wait per phase")
@click.option("--poll-interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True, metavar="SECONDS",
              help="how often readiness is checked")
@click.option("--no-wait", is_flag=True, help="apply without waiting for readiness between phases")
@output_option
def install_cmd(source: Path, render_dir: Path | None, do_apply: bool, image: str, federation_store: str,
                federation_cluster: str | None, federation_url: str | None, root_dir: Path | None,
                storage_class: str | None, storage_size: str, gateway_replicas: int, etcd_image: str,
                cluster_domain: str, dns_ips: tuple[str, ...], kubeconfig: str | None, context_map: tuple[str, ...],
                context_prefix: str,
                only: tuple[str, ...], timeout: float, poll_interval: float, no_wait: bool,
                output: str) -> None:
    """Render (--render DIR) and/or apply (--apply) meshfed on every cluster of a clusterset.

    SOURCE is a clusterset (its directory or clusterset.yaml), or a directory rendered earlier (with --apply)."""
    err = console(stderr=True)
    result: dict[str, Any] = {}
    if source.is_dir() and (source / PLAN).exists():
        if not do_apply:
            fail(f"{source} is a render directory; nothing to do without --apply",
                 hint=f"meshfed install {source} --apply")
        if render_dir is not None:
            fail("--render needs a clusterset as SOURCE, not a render directory")
        plan_dir = source
    else:
        if render_dir is None:
            fail("give --render DIR (where the manifests go)",
                 hint=f"meshfed install {source} --render out/ , review, then add --apply")
            return
        try:
            cs = load_clusterset(source)
            cs_file = clusterset_file(source)
            cs_text = cs_file.read_text(encoding="utf-8")
        except ClusterSetError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"{source}: cannot read: {exc}")
        opts = InstallOptions(
            image=image, federation_store="etcd" if federation_store == "etcd" else "sqlite",
            federation_cluster=federation_cluster, federation_url=federation_url, etcd_image=etcd_image,
            storage_size=storage_size, storage_class=storage_class, gateway_replicas=gateway_replicas,
            cluster_domain=cluster_domain, dns_service_ips=_pairs(dns_ips, "--dns-service-ip", "CLUSTER=IP"),
        )
        try:
            ensure_render_dir(render_dir)
            ca_root = root_dir if root_dir is not None else render_dir / "ca"
            report = prepare_ca(cs, ca_root, create_root=root_dir is None)
            rendered = render_clusterset(cs, report.ca, opts, clusterset_yaml=cs_text)
            written = write_render(render_dir, rendered, clusterset_text=cs_text)
        except InstallError as exc:
            fail(str(exc))
        for made in report.created:
            err.print(f"created CA directory {made} (keys 0600)")
        if root_dir is None and report.created and str(ca_root) in report.created:
            err.print(f"[yellow]note:[/] the root CA was created in {ca_root}; move it offline after installing "
                      "and pass it with --root next time")
        for w in rendered.warnings:
            err.print(f"[yellow]warning:[/] {w}")
        files = [m for m in rendered.manifests]
        err.print(f"rendered {len(files)} manifests for {len(cs.clusters)} clusters into {render_dir} "
                  f"({len(written.written)} written, {len(written.unchanged)} unchanged, "
                  f"{len(written.removed)} removed); apply order in {render_dir / 'README.txt'}")
        result["render"] = {
            "directory": str(render_dir),
            "root": str(ca_root),
            "created_ca": list(report.created),
            "federation_cluster": str(rendered.federation_cluster),
            "files": [{"cluster": str(m.cluster), "file": f"{m.cluster}/{m.filename}", "phase": str(m.phase),
                       "objects": len(m.objects), "private": m.secret} for m in files],
            "written": len(written.written),
            "unchanged": len(written.unchanged),
            "warnings": list(rendered.warnings),
            "cluster_dns": [{"cluster": d.cluster, "forward": d.upstream} for d in rendered.cluster_dns],
        }
        plan_dir = render_dir
        if not do_apply:
            err.print(f"next: review the files, then `meshfed install {plan_dir} --apply`")
    if do_apply:
        try:
            plan = load_plan(plan_dir, clusters=list(only) or None)
        except InstallError as exc:
            fail(str(exc))
        targets = [c for c in plan.clusters if not only or c in only]
        contexts = _contexts(context_map, context_prefix, list(plan.clusters))
        clients = _clients(kubeconfig, {c: contexts[c] for c in targets})
        started = time.monotonic()
        try:
            outcomes = apply_plan(plan, clients, reporter=RichReporter(err), timeout=timeout,
                                  poll=poll_interval, wait=not no_wait)
        except InstallError as exc:
            fail(str(exc), hint="fix the cause and run the same command again: applying is safe to repeat")
        counts = {a: sum(1 for o in outcomes if o.action == a) for a in ("created", "replaced", "unchanged", "kept")}
        summary = ", ".join(f"{n} {a}" for a, n in counts.items() if n) or "nothing to do"
        err.print(f"applied to {', '.join(targets)} in {time.monotonic() - started:.1f}s: {summary}")
        result["apply"] = {
            "clusters": targets,
            "contexts": {c: contexts[c] for c in targets},
            "counts": counts,
            "objects": [{"cluster": o.cluster, "object": o.ref, "action": o.action} for o in outcomes],
        }
    if output == "json":
        print_json(result)
