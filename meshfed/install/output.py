"""The render directory (an IO edge): writing what :func:`meshfed.install.render.render_clusterset` made, and
reading it back as an apply plan.

Layout::

    DIR/README.txt               what each file is and the apply order
    DIR/clusterset.yaml          a copy of the clusterset the manifests were rendered from
    DIR/plan.json                the apply order, machine-readable (what ``--apply`` follows)
    DIR/<cluster>/NN-*.yaml      one cluster's manifests; files holding private keys are 0600
    DIR/<cluster>/cluster-dns/   the clusterset.local forward for the cluster's own DNS (a CoreDNS server block,
                                 a kube-dns stub domain): not in the plan, added to the cluster DNS by hand
    DIR/<cluster>/prometheus/    prometheus.yml and rules.yml for a Prometheus in that cluster (no ServiceMonitor;
                                 docs/observability.md): not in the plan either
    DIR/ca/                      the root CA, when ``--root`` was not given (keys 0600; move it offline)

Files are written atomically and only when their content changes; manifests of an earlier render that this one
no longer produces (e.g. the federation moved to another cluster) are removed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from federation.files import write_atomic
from meshfed import prometheus as prom
from meshfed.install import PlanError, clusterdns
from meshfed.install.render import (
    ADMIN_PORT,
    FEDERATION_METRICS_PORT,
    GATEWAY_METRICS_PORT,
    PHASES,
    ApplyPhase,
    Manifest,
    Rendered,
)

PLAN = "plan.json"
README = "README.txt"
CLUSTERSET_COPY = "clusterset.yaml"
_MANIFEST_FILE = re.compile(r"^\d\d-[a-z0-9-]+\.yaml$")


@dataclass(frozen=True, slots=True)
class WriteReport:
    written: tuple[Path, ...]
    unchanged: tuple[Path, ...]
    removed: tuple[Path, ...]


def manifest_text(m: Manifest) -> str:
    header = (
        f"# meshfed install: cluster {m.cluster}, phase {m.phase}: {m.description}\n"
        "# Rendered by `meshfed install`; apply with `meshfed install DIR --apply` (order: DIR/README.txt).\n"
    )
    docs = [yaml.safe_dump(obj, sort_keys=False, default_flow_style=False) for obj in m.objects]
    return header + "---\n" + "---\n".join(docs)


def apply_order(rendered: Rendered) -> list[Manifest]:
    """Every manifest in apply order: phase by phase, and within a phase cluster by cluster (clusterset order)."""
    order = {c.id: i for i, c in enumerate(rendered.clusterset.clusters)}
    return sorted(rendered.manifests, key=lambda m: (PHASES.index(m.phase), order[m.cluster], m.filename))


def readme_text(rendered: Rendered) -> str:
    cs = rendered.clusterset
    lines = [
        f"meshfed install: manifests for clusterset {cs.name} (trust domain {cs.trust_domain})",
        "",
        "Apply them with `meshfed install DIR --apply` (kubeconfig context per cluster: see docs/install.md), or",
        "with kubectl in exactly this order, waiting for each phase's Deployments/StatefulSets to be ready",
        "before starting the next phase:",
        "",
    ]
    phase: ApplyPhase | None = None
    for m in apply_order(rendered):
        if m.phase != phase:
            phase = m.phase
            lines.append(f"phase {phase}:")
        mode = "  (private keys, 0600)" if m.secret else ""
        lines.append(f"  kubectl --context {m.cluster} apply -f {m.cluster}/{m.filename}    # {m.description}{mode}")
    lines += ["", f"The federation service runs in cluster {rendered.federation_cluster}."]
    lines += ["", "Prometheus (not applied by meshfed: a scrape configuration for a Prometheus in each cluster, "
              "see docs/observability.md):"]
    for c in cs.clusters:
        lines.append(f"  {c.id}/{PROMETHEUS_DIR}/{prom.CONFIG_FILE}, {c.id}/{PROMETHEUS_DIR}/{prom.RULES_FILE}")
    if rendered.cluster_dns:
        lines += ["", "Cluster DNS (not applied by meshfed: add it to each cluster's own DNS, see docs/install.md):"]
        for dns in rendered.cluster_dns:
            lines.append(f"  {dns.cluster}/{clusterdns.DIRECTORY}/{clusterdns.COREFILE_BLOCK}    # CoreDNS: forward "
                         f"{clusterdns.ZONE} to {dns.upstream} (Service {dns.service})")
            lines.append(f"  {dns.cluster}/{clusterdns.DIRECTORY}/{clusterdns.KUBE_DNS_STUB}    # the same for "
                         "kube-dns (stubDomains)")
    for w in rendered.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines) + "\n"


def plan_json(rendered: Rendered) -> str:
    plan = {
        "clusterset": rendered.clusterset.name,
        "clusters": [str(c.id) for c in rendered.clusterset.clusters],
        "federationCluster": str(rendered.federation_cluster),
        "steps": [{"phase": str(m.phase), "cluster": str(m.cluster), "file": f"{m.cluster}/{m.filename}"}
                  for m in apply_order(rendered)],
    }
    return json.dumps(plan, indent=2) + "\n"


def _write(path: Path, text: str, *, private: bool, report: tuple[list[Path], list[Path]]) -> None:
    data = text.encode()
    mode = 0o600 if private else 0o644
    try:
        if path.exists() and path.read_bytes() == data:
            if (path.stat().st_mode & 0o777) != mode:
                os.chmod(path, mode)
            report[1].append(path)
            return
        write_atomic(path, data, mode=mode)
    except OSError as exc:
        raise PlanError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    report[0].append(path)


def ensure_render_dir(out: Path) -> None:
    """Create the render folder 0700 (it will hold private keys); a folder that exists keeps its mode (the files
    holding keys are 0600 anyway)."""
    try:
        if not out.exists():
            out.mkdir(parents=True)
            os.chmod(out, 0o700)
    except OSError as exc:
        raise PlanError(f"{out}: cannot create the render directory: {exc.strerror or exc}") from exc


def write_render(out: Path, rendered: Rendered, *, clusterset_text: str) -> WriteReport:
    """Write ``rendered`` into ``out`` (created 0700 when new: it holds private keys)."""
    written: list[Path] = []
    unchanged: list[Path] = []
    removed: list[Path] = []
    report = (written, unchanged)
    ensure_render_dir(out)
    _write(out / CLUSTERSET_COPY, clusterset_text, private=False, report=report)
    for cluster in rendered.clusterset.clusters:
        cdir = out / str(cluster.id)
        try:
            cdir.mkdir(exist_ok=True)
            os.chmod(cdir, 0o700)
        except OSError as exc:
            raise PlanError(f"{cdir}: cannot create: {exc.strerror or exc}") from exc
        mine = rendered.for_cluster(str(cluster.id))
        for m in mine:
            _write(cdir / m.filename, manifest_text(m), private=m.secret, report=report)
        keep = {m.filename for m in mine}
        for stale in sorted(cdir.iterdir()):
            if _MANIFEST_FILE.match(stale.name) and stale.name not in keep:
                stale.unlink()
                removed.append(stale)
        _write_cluster_dns(cdir / clusterdns.DIRECTORY, rendered.dns_for(str(cluster.id)), report, removed)
        pdir = cdir / PROMETHEUS_DIR
        pdir.mkdir(exist_ok=True)
        for name, text in prometheus_files(rendered, str(cluster.id)).items():
            _write(pdir / name, text, private=False, report=report)
    _write(out / README, readme_text(rendered), private=False, report=report)
    _write(out / PLAN, plan_json(rendered), private=False, report=report)
    return WriteReport(tuple(written), tuple(unchanged), tuple(removed))


PROMETHEUS_DIR = "prometheus"


def prometheus_files(rendered: Rendered, cluster: str) -> dict[str, str]:
    """The scrape configuration and recording rules for a Prometheus running in ``cluster`` (the same rules a
    local run's Prometheus has; the federation's metrics only in the cluster that runs it)."""
    config = prom.kubernetes_config(
        cluster=cluster, namespace=rendered.namespace, controlplane_port=ADMIN_PORT, gateway_port=GATEWAY_METRICS_PORT,
        federation_port=FEDERATION_METRICS_PORT if cluster == str(rendered.federation_cluster) else None)
    return {prom.CONFIG_FILE: prom.dump(config), prom.RULES_FILE: prom.dump(prom.recording_rules())}


def _write_cluster_dns(ddir: Path, dns: clusterdns.ClusterDns | None, report: tuple[list[Path], list[Path]],
                       removed: list[Path]) -> None:
    """The cluster's ``clusterset.local`` forward pieces, or none (and an earlier render's removed)."""
    if dns is None:
        for name in clusterdns.FILES:
            if (ddir / name).exists():
                (ddir / name).unlink()
                removed.append(ddir / name)
        if ddir.is_dir() and not any(ddir.iterdir()):
            ddir.rmdir()
        return
    try:
        ddir.mkdir(exist_ok=True)
    except OSError as exc:
        raise PlanError(f"{ddir}: cannot create: {exc.strerror or exc}") from exc
    _write(ddir / clusterdns.COREFILE_BLOCK, dns.corefile_block(), private=False, report=report)
    _write(ddir / clusterdns.KUBE_DNS_STUB, dns.kube_dns_text(), private=False, report=report)


# --------------------------------------------------------------------------------------------- reading back


@dataclass(frozen=True, slots=True)
class Step:
    """One file of the plan: its phase, cluster and parsed objects."""

    phase: str
    cluster: str
    file: Path
    objects: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class Plan:
    directory: Path
    clusterset: str
    clusters: tuple[str, ...]
    federation_cluster: str
    steps: tuple[Step, ...]

    def phases(self) -> list[tuple[str, list[Step]]]:
        """Steps grouped by phase, in order."""
        out: list[tuple[str, list[Step]]] = []
        for step in self.steps:
            if not out or out[-1][0] != step.phase:
                out.append((step.phase, []))
            out[-1][1].append(step)
        return out


def _objects(path: Path) -> tuple[dict[str, Any], ...]:
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise PlanError(f"{path}: missing (render again with `meshfed install CLUSTERSET --render DIR`)") from None
    except (OSError, yaml.YAMLError) as exc:
        raise PlanError(f"{path}: cannot read: {exc}") from exc
    objs: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind") \
                or not (doc.get("metadata") or {}).get("name"):
            raise PlanError(f"{path}: document {i + 1} is not a Kubernetes object (apiVersion, kind, metadata.name)")
        objs.append(doc)
    return tuple(objs)


def load_plan(directory: Path, *, clusters: Sequence[str] | None = None) -> Plan:
    """Read ``directory/plan.json`` and every file it names (only those of ``clusters``, when given)."""
    path = directory / PLAN
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"{path}: missing; {directory} is not a render directory of `meshfed install --render`") \
            from None
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: cannot read: {exc}") from exc
    try:
        names = tuple(str(c) for c in raw["clusters"])
        wanted = set(clusters) if clusters else set(names)
        unknown = wanted - set(names)
        if unknown:
            raise PlanError(f"{path}: no cluster {', '.join(sorted(unknown))} in this render "
                            f"(clusters: {', '.join(names)})")
        known_phases = {str(p) for p in PHASES}
        steps = []
        for i, s in enumerate(raw["steps"]):
            if s["phase"] not in known_phases:
                raise PlanError(f"{path}: steps[{i}].phase {s['phase']!r} is not one of {sorted(known_phases)}")
            if s["cluster"] in wanted:
                steps.append(Step(s["phase"], s["cluster"], directory / s["file"], _objects(directory / s["file"])))
        return Plan(directory, str(raw["clusterset"]), names, str(raw["federationCluster"]), tuple(steps))
    except (KeyError, TypeError) as exc:
        raise PlanError(f"{path}: malformed plan ({exc!r} missing or wrong type)") from exc
