"""``meshfed export`` and ``meshfed unexport``: mark a Service as exported to the clusterset, or stop exporting it.

Two targets:

* a local clusterset folder (default ``clusters/demo``): the command writes or removes the ServiceExport
  manifest ``<clusterset>/<cluster>/serviceexport-<service>-<namespace>.yaml``, which the manifest source of a
  running control plane picks up;
* a real cluster (``--context CTX``, optionally ``--kubeconfig FILE``): the command creates or deletes the
  ServiceExport object through the Kubernetes API, at ``multicluster.x-k8s.io/v1beta1`` where the cluster serves it,
  else ``v1alpha1``. A local folder gets v1beta1 (the manifest source reads both).

Local file edits live in plain functions (:func:`export_local`, :func:`unexport_local`) that raise
:class:`ExportError`; the click commands only print.

Exception tree (this module)::

    ExportError             the export or unexport cannot be done; the message says why and what to do
     +-- NotExported        unexport of something that is not exported
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import yaml

from discovery.clusterset import DEFAULT_CLUSTERSET_DIR, ClusterSetError, load_clusterset
from discovery.convert import MCS_GROUP, format_timestamp, service_export_object
from discovery.manifests import ManifestSource
from discovery.model import DiscoveryError, ServiceKey, namespace, service_name
from federation.files import write_atomic
from meshfed.output import console, fail, output_option, print_json


class ExportError(Exception):
    """An export or unexport that cannot be done; ``hint`` says what to do next."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class NotExported(ExportError):
    """Unexport of a service that has no ServiceExport."""


@dataclass(frozen=True, slots=True)
class ExportOutcome:
    action: str  # "exported", "already-exported", "unexported", "not-exported"
    cluster: str
    namespace: str
    service: str
    target: str  # the file written/edited/removed, or the API server context
    created: str = ""
    warnings: tuple[str, ...] = ()


def export_file_name(key: ServiceKey) -> str:
    return f"serviceexport-{key.name}-{key.namespace}.yaml"


def _key(service: str, ns: str) -> ServiceKey:
    try:
        return ServiceKey(namespace=namespace(ns), name=service_name(service))
    except DiscoveryError as exc:
        raise ExportError(str(exc)) from None


def _cluster_dir(clusterset: Path, cluster: str) -> Path:
    try:
        cs = load_clusterset(clusterset)
        return cs.cluster_dir(cluster)
    except ClusterSetError as exc:
        raise ExportError(str(exc)) from None


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"), mode=0o644)


def export_local(
    *, clusterset: Path, cluster: str, service: str, ns: str, force: bool = False, now: datetime | None = None
) -> ExportOutcome:
    """Write the ServiceExport manifest for ``service.ns`` in ``cluster`` of the local clusterset."""
    key = _key(service, ns)
    directory = _cluster_dir(clusterset, cluster)
    loaded = ManifestSource(directory, cluster).load()
    warnings = tuple(str(p) for p in loaded.errors)
    snap = loaded.snapshot
    if key in snap.exports:
        existing = _find_exports(directory, key)
        where = str(existing[0][0]) if existing else str(directory)
        return ExportOutcome(
            "already-exported",
            cluster,
            key.namespace,
            key.name,
            where,
            format_timestamp(snap.exports[key].created),
            warnings,
        )
    if key not in snap.services and not force:
        if key in snap.unsupported:
            raise ExportError(
                f"{snap.unsupported[key]} in cluster {cluster}; the MCS API cannot export it",
                hint="pass --force to write the ServiceExport anyway (it will be reported Valid=False)",
            )
        raise ExportError(
            f"Service {key.namespace}/{key.name} does not exist in cluster {cluster}'s manifests ({directory})",
            hint="add the Service manifest first, or pass --force to export it ahead of the Service",
        )
    path = directory / export_file_name(key)
    if path.exists():
        raise ExportError(
            f"{path} exists but does not hold a valid ServiceExport for {key.namespace}/{key.name}",
            hint="fix or remove that file, then export again",
        )
    created = (now or datetime.now(UTC)).replace(microsecond=0)
    body = service_export_object(key, created)
    text = (
        f"# Written by `meshfed export {key.name} -n {key.namespace} --cluster {cluster}`; "
        f"`meshfed unexport` removes it.\n" + yaml.safe_dump(body, sort_keys=False)
    )
    _write_atomic(path, text)
    return ExportOutcome("exported", cluster, key.namespace, key.name, str(path), format_timestamp(created), warnings)


_SEPARATOR = re.compile(r"^---[ \t]*(#.*)?$")


def _split_documents(text: str) -> list[tuple[str, str]]:
    """Split YAML text into (separator line or "", document text) chunks, keeping every byte."""
    chunks: list[tuple[str, str]] = []
    sep, body = "", list[str]()
    for line in text.splitlines(keepends=True):
        if _SEPARATOR.match(line.rstrip("\r\n")):
            if body or sep or chunks:
                chunks.append((sep, "".join(body)))
            sep, body = line, []
        else:
            body.append(line)
    chunks.append((sep, "".join(body)))
    return chunks


def _is_export_of(doc: Any, key: ServiceKey) -> bool:
    if not isinstance(doc, dict) or doc.get("kind") != "ServiceExport":
        return False
    if not str(doc.get("apiVersion", "")).startswith(f"{MCS_GROUP}/"):
        return False
    meta = doc.get("metadata") or {}
    return bool(
        isinstance(meta, dict)
        and meta.get("name") == key.name
        and (meta.get("namespace") or "default") == key.namespace
    )


def _find_exports(directory: Path, key: ServiceKey) -> list[tuple[Path, list[int]]]:
    """Files (sorted) holding a ServiceExport for ``key``, with the chunk indexes that hold it."""
    found: list[tuple[Path, list[int]]] = []
    if not directory.is_dir():
        return found
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()):
        try:
            chunks = _split_documents(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        hits = []
        for i, (_, chunk) in enumerate(chunks):
            try:
                doc = yaml.safe_load(chunk)
            except yaml.YAMLError:
                continue
            if _is_export_of(doc, key):
                hits.append(i)
        if hits:
            found.append((path, hits))
    return found


def unexport_local(*, clusterset: Path, cluster: str, service: str, ns: str) -> ExportOutcome:
    """Remove every ServiceExport manifest for ``service.ns`` in ``cluster``: delete a file that holds nothing
    else, or rewrite a multi-document file without that document (other documents kept byte for byte)."""
    key = _key(service, ns)
    directory = _cluster_dir(clusterset, cluster)
    found = _find_exports(directory, key)
    if not found:
        raise NotExported(
            f"{key.namespace}/{key.name} is not exported from cluster {cluster} (no ServiceExport in {directory})"
        )
    touched: list[str] = []
    for path, hits in found:
        text = path.read_text(encoding="utf-8")
        chunks = _split_documents(text)
        try:
            whole = list(yaml.safe_load_all(text))
            pieces = [yaml.safe_load(c) for _, c in chunks]
        except yaml.YAMLError as exc:
            raise ExportError(f"{path} is not valid YAML ({exc}); remove the ServiceExport by hand") from None
        if [d for d in whole if d is not None] != [d for d in pieces if d is not None]:
            raise ExportError(f"cannot safely split {path} into documents; remove the ServiceExport by hand")
        kept = [c for i, c in enumerate(chunks) if i not in hits]
        if all(yaml.safe_load(body) is None for _, body in kept):
            path.unlink()
            touched.append(f"removed {path}")
        else:
            _write_atomic(path, "".join(sep + body for sep, body in kept))
            touched.append(f"edited {path}")
    return ExportOutcome("unexported", cluster, key.namespace, key.name, "; ".join(touched))


# --------------------------------------------------------------------------------------------------------------
# Against a real cluster (kubeconfig context)


def _api(kubeconfig: str | None, context: str) -> Any:
    from discovery.kube import KubeConfigError, load_api_client

    try:
        return load_api_client(kubeconfig=kubeconfig, context=context)
    except KubeConfigError as exc:
        raise ExportError(
            f"cannot use kubeconfig context {context!r}: {exc}",
            hint="check --kubeconfig and `kubectl config get-contexts`",
        ) from exc


def _api_failure(exc: Exception, context: str) -> ExportError:
    """A Kubernetes error (``discovery.kube.KubeError``) as the command reports it."""
    from discovery.kube import KubeApiError

    if isinstance(exc, KubeApiError):
        return ExportError(f"the API server of context {context} refused: {exc.status} {exc.message or exc.reason}")
    return ExportError(f"cannot reach the API server of context {context}: {exc}")


def export_remote(*, kubeconfig: str | None, context: str, service: str, ns: str, force: bool = False) -> ExportOutcome:
    """Create the ServiceExport object in the cluster of kubeconfig ``context`` (through ``discovery.kube``'s
    client: the one place kubeconfig is loaded and ServiceExports are written)."""
    from discovery.kube import KubeError, create_service_export_sync, get_service_export_sync, service_exists_sync

    key = _key(service, ns)
    api = _api(kubeconfig, context)
    try:
        if not force and not service_exists_sync(api, key):
            raise ExportError(
                f"Service {key.namespace}/{key.name} does not exist in context {context}",
                hint="create the Service first, or pass --force to export it ahead of the Service",
            )
        created = create_service_export_sync(api, key, exist_ok=True)
        obj = get_service_export_sync(api, key)
    except KubeError as exc:
        raise _api_failure(exc, context) from exc
    finally:
        api.close()
    meta = obj.get("metadata") if obj is not None else None
    stamp = str(meta.get("creationTimestamp") or "") if isinstance(meta, dict) else ""
    return ExportOutcome("exported" if created else "already-exported", context, key.namespace, key.name,
                         f"context {context}", stamp)


def unexport_remote(*, kubeconfig: str | None, context: str, service: str, ns: str) -> ExportOutcome:
    """Delete the ServiceExport object in the cluster of kubeconfig ``context``."""
    from discovery.kube import KubeError, KubeNotFound, delete_service_export_sync

    key = _key(service, ns)
    api = _api(kubeconfig, context)
    try:
        delete_service_export_sync(api, key)
    except KubeNotFound:
        raise NotExported(f"{key.namespace}/{key.name} is not exported in context {context}") from None
    except KubeError as exc:
        raise _api_failure(exc, context) from exc
    finally:
        api.close()
    return ExportOutcome("unexported", context, key.namespace, key.name, f"context {context}")


# --------------------------------------------------------------------------------------------------------------
# The commands


def _common(fn: Any) -> Any:
    fn = click.option("--kubeconfig", type=click.Path(dir_okay=False), help="kubeconfig file for --context")(fn)
    fn = click.option(
        "--context", "context", metavar="CTX", help="act on a real cluster through this kubeconfig context"
    )(fn)
    fn = click.option(
        "--clusterset",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_CLUSTERSET_DIR,
        show_default=True,
        help="local clusterset folder (holds clusterset.yaml)",
    )(fn)
    fn = click.option("--cluster", metavar="C", help="member cluster whose manifests to edit (local clusterset)")(fn)
    fn = click.option(
        "-n", "--namespace", "ns", default=None, help="the Service's namespace (default: default, or NS of SVC.NS)"
    )(fn)
    fn = click.argument("service", metavar="SERVICE|SVC.NS")(fn)
    return fn


def split_service(service: str, ns: str | None) -> tuple[str, str]:
    """``SERVICE`` with ``-n NS`` (default ``default``), or ``SVC.NS`` as ``diagnose`` and the docs write it (also
    ``SVC.NS.svc.clusterset.local``); a namespace given both ways must agree."""
    text = service.removesuffix(".svc.clusterset.local").removesuffix(".svc.cluster.local")
    if "." not in text:
        return text, ns or "default"
    name, _, inner = text.partition(".")
    if "." in inner or not name or not inner:
        raise ExportError(f"service {service!r}: expected SERVICE or SVC.NS (e.g. details or details.default)")
    if ns is not None and ns != inner:
        raise ExportError(f"service {service!r} names namespace {inner!r} but -n says {ns!r}",
                          hint="give the namespace once: SVC.NS, or SERVICE -n NS")
    return name, inner


def _report(outcome: ExportOutcome, output: str) -> None:
    if output == "json":
        print_json(asdict(outcome))
        return
    err = console(stderr=True)
    for w in outcome.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    out = console()
    name = f"{outcome.service}.{outcome.namespace}"
    where = f"cluster {outcome.cluster}" if not outcome.target.startswith("context ") else outcome.target
    if outcome.action == "exported":
        out.print(f"exported {name} from {where} (created {outcome.created}; {outcome.target})")
    elif outcome.action == "already-exported":
        out.print(f"{name} is already exported from {where} (created {outcome.created}; {outcome.target})")
    elif outcome.action == "unexported":
        out.print(f"unexported {name} from {where} ({outcome.target})")
    else:
        out.print(f"{name} was not exported from {where}")


def _check_target(cluster: str | None, context: str | None) -> None:
    if context is None and not cluster:
        fail(
            "--cluster is required for a local clusterset",
            hint="e.g. --cluster east, or --context CTX for a real cluster",
        )


@click.command("export")
@_common
@click.option("--force", is_flag=True, help="export even when the Service does not exist (yet)")
@output_option
def export_cmd(
    service: str,
    ns: str | None,
    cluster: str | None,
    clusterset: Path,
    context: str | None,
    kubeconfig: str | None,
    force: bool,
    output: str,
) -> None:
    """Export SERVICE (or SVC.NS) to the clusterset (creates its ServiceExport).

    Locally, writes <clusterset>/<cluster>/serviceexport-SERVICE-NS.yaml; with --context, creates the
    ServiceExport object in that cluster.
    """
    _check_target(cluster, context)
    try:
        service, ns = split_service(service, ns)
        if context is not None:
            outcome = export_remote(kubeconfig=kubeconfig, context=context, service=service, ns=ns, force=force)
        else:
            assert cluster is not None
            outcome = export_local(clusterset=clusterset, cluster=cluster, service=service, ns=ns, force=force)
    except ExportError as exc:
        fail(str(exc), hint=exc.hint)
        return
    _report(outcome, output)


@click.command("unexport")
@_common
@click.option("--ignore-not-found", is_flag=True, help="succeed when the service is not exported")
@output_option
def unexport_cmd(
    service: str,
    ns: str | None,
    cluster: str | None,
    clusterset: Path,
    context: str | None,
    kubeconfig: str | None,
    ignore_not_found: bool,
    output: str,
) -> None:
    """Stop exporting SERVICE (or SVC.NS) (removes its ServiceExport).

    Locally, removes the ServiceExport manifest from <clusterset>/<cluster>/; with --context, deletes the
    ServiceExport object in that cluster.
    """
    _check_target(cluster, context)
    try:
        service, ns = split_service(service, ns)
        if context is not None:
            outcome = unexport_remote(kubeconfig=kubeconfig, context=context, service=service, ns=ns)
        else:
            assert cluster is not None
            outcome = unexport_local(clusterset=clusterset, cluster=cluster, service=service, ns=ns)
    except NotExported as exc:
        if not ignore_not_found:
            fail(str(exc), hint="pass --ignore-not-found to treat this as success")
            return
        where = context if context is not None else (cluster or "")
        name, space = split_service(service, ns)
        outcome = ExportOutcome(
            "not-exported", where, space, name, f"context {context}" if context else str(clusterset)
        )
    except ExportError as exc:
        fail(str(exc), hint=exc.hint)
        return
    _report(outcome, output)
