"""``meshfed inject -f FILE``: the webhook's injection, offline (like ``istioctl kube-inject``).

Reads one or more YAML (or JSON) documents, a ``List`` included, injects every Pod and workload pod template with
:func:`meshfed.inject.inject_object` (the same function the webhook uses), and prints the result. What happened to
each object goes to stderr, so stdout can be piped to ``kubectl apply -f -``. See docs/injection.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from meshfed.inject import InjectError, inject_object
from meshfed.install.render import (
    DEFAULT_IMAGE,
    NAMESPACE,
    InstallOptions,
    inject_config,
    object_ref,
)
from meshfed.output import fail


def _load(source: str, text: str) -> list[Any]:
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{source}: not YAML or JSON: {exc}") from exc


@click.command("inject")
@click.option("-f", "--filename", "filename", required=True, metavar="FILE",
              help="Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, a List, or several YAML "
                   "documents; - reads stdin")
@click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True,
              help="yaml: one document per object; json: one object, or a v1 List of several")
@click.option("--cluster", required=True, help="the cluster the workloads run in (its name in the clusterset)")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="meshfed's image (init and sidecar)")
@click.option("--image-pull-policy", type=click.Choice(["Always", "IfNotPresent", "Never"]), default="IfNotPresent",
              show_default=True)
@click.option("--meshfed-namespace", default=NAMESPACE, show_default=True,
              help="where meshfed install put the control plane")
@click.option("--cluster-domain", default="cluster.local", show_default=True)
def inject_cmd(filename: str, output: str, cluster: str, image: str, image_pull_policy: str,
               meshfed_namespace: str, cluster_domain: str) -> None:
    """Add meshfed's capture init container and sidecar to the workloads in FILE and print them."""
    source = "stdin" if filename == "-" else filename
    try:
        text = sys.stdin.read() if filename == "-" else Path(filename).read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"{source}: {exc.strerror or exc}", code=2)
    opts = InstallOptions(image=image, namespace=meshfed_namespace, cluster_domain=cluster_domain,
                          image_pull_policy=image_pull_policy)  # type: ignore[arg-type]
    config = inject_config(cluster, opts)
    docs = _load(source, text)
    if not docs:
        fail(f"{source}: no documents", code=2)
    out: list[Any] = []
    for i, doc in enumerate(docs, start=1):
        what = f"{source}: document {i}" + (f" ({object_ref(doc)})" if isinstance(doc, dict) else "")
        try:
            result = inject_object(doc, config)
        except InjectError as exc:
            fail(f"{what}: {exc}", code=2)
        out.append(result.obj)
        for note in result.notes:
            click.echo(f"{what}: {note}", err=True)
    if output == "json":
        data = out[0] if len(out) == 1 else {"apiVersion": "v1", "kind": "List", "items": out}
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False), nl=False)
