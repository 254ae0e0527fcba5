"""The manifest source: one cluster's Kubernetes YAML read from ``clusters/<clusterset>/<cluster>/*.yaml``.

Files hold one or more YAML documents (``---``), each a Kubernetes object (or a ``v1 List`` of them). Objects are
converted by the pure functions in ``discovery.convert``; this module only reads files, tracks what was last
accepted, and watches for changes.

Acceptance is per file: a file whose every document converts is accepted whole; a file with any error (YAML
syntax, a bad field) is rejected whole, reported with file, document number (1-based) and field, and the last
version of that file that was accepted stays in force. Objects of kinds nobody registered are skipped with a
warning. A file that is deleted takes its objects with it.

Nothing here raises for bad content: :meth:`ManifestSource.load` returns the snapshot in force alongside the
problems it found.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from discovery.clusterset import ClusterSet
from discovery.convert import (
    ConversionError,
    EndpointSlice,
    ExternalNameService,
    UnsupportedKind,
    assemble,
    convert,
    type_of,
)
from discovery.mcs import McsResult, derive
from discovery.model import (
    ClusterId,
    Registry,
    Service,
    ServiceExport,
    cluster_id,
)
from discovery.source import ERROR, WARNING, ClusterSnapshot, LoadResult, ManifestProblem

log = logging.getLogger("meshfed.discovery.manifests")

MANIFEST_SUFFIXES = (".yaml", ".yml")
@dataclass(frozen=True, slots=True)
class _FileResult:
    digest: str
    objects: tuple[tuple[tuple[str, str, str, str], Any], ...]  # ((apiVersion, kind, ns, name), converted)
    problems: tuple[ManifestProblem, ...]

    @property
    def ok(self) -> bool:
        return not any(p.severity == ERROR for p in self.problems)


def _identity(obj: Mapping[str, Any], api_version: str, kind: str) -> tuple[str, str, str, str]:
    meta = obj.get("metadata")
    name = ns = ""
    if isinstance(meta, Mapping):
        name = str(meta.get("name") or "")
        ns = str(meta.get("namespace") or "default")
    return (api_version, kind, ns, name)


def parse_file(
    text: str, *, file: str, cluster: ClusterId
) -> tuple[list[tuple[tuple[str, str, str, str], Any]], list[ManifestProblem]]:
    """Parse and convert every document of one manifest file's text (pure; used by the source and by tests).

    Returns the converted objects with their identities, and the problems (errors and skip warnings).
    """
    objects: list[tuple[tuple[str, str, str, str], Any]] = []
    problems: list[ManifestProblem] = []
    docs: list[Any] = []
    try:
        for doc in yaml.safe_load_all(text):
            docs.append(doc)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        problems.append(ManifestProblem(file, len(docs) + 1, "", f"not valid YAML{line}: {problem}"))
        return objects, problems
    for index, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        items: list[tuple[str, Any]] = [("", doc)]
        if isinstance(doc, Mapping) and doc.get("apiVersion") == "v1" and doc.get("kind") == "List":
            raw_items = doc.get("items") or []
            if not isinstance(raw_items, list):
                problems.append(ManifestProblem(file, index, "items", "must be a list"))
                continue
            items = [(f"items[{i}].", item) for i, item in enumerate(raw_items)]
        for prefix, item in items:
            try:
                api_version, kind = type_of(item)
                converted = convert(item, cluster=cluster)
            except UnsupportedKind as exc:
                problems.append(
                    ManifestProblem(
                        file,
                        index,
                        prefix + "kind",
                        f"{exc.api_version}/{exc.kind}: not a kind meshfed understands; skipped",
                        WARNING,
                    )
                )
                continue
            except ConversionError as exc:
                msg = f"{exc.obj}: {exc.reason}" if exc.obj else exc.reason
                problems.append(ManifestProblem(file, index, prefix + exc.field, msg))
                continue
            objects.append((_identity(item, api_version, kind), converted))
    return objects, problems


class ManifestSource:
    """One cluster's manifest folder, loaded on demand and watched by polling.

    ``load()`` is synchronous file IO (small files); ``watch()`` runs it in a thread so the event loop never
    blocks.
    """

    def __init__(self, directory: Path | str, cluster: ClusterId | str) -> None:
        self.directory = Path(directory)
        self.cluster = cluster_id(cluster)
        self._good: dict[str, _FileResult] = {}
        self._last: LoadResult = LoadResult(ClusterSnapshot(cluster=self.cluster, version=_digest([])))

    @classmethod
    def for_cluster(cls, clusterset: ClusterSet, name: str) -> ManifestSource:
        return cls(clusterset.cluster_dir(name), name)

    @property
    def last(self) -> LoadResult:
        """The result of the most recent load."""
        return self._last

    def files(self) -> list[Path]:
        """The manifest files, sorted by name (the order in which duplicates are resolved)."""
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        return sorted(
            p for p in entries if p.suffix in MANIFEST_SUFFIXES and not p.name.startswith(".") and p.is_file()
        )

    def signature(self) -> tuple[Any, ...]:
        """What the poller compares: names, sizes, inodes and mtimes (ns) of the manifest files."""
        sig: list[tuple[str, int, int, int]] = []
        for p in self.files():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            sig.append((p.name, st.st_size, st.st_ino, st.st_mtime_ns))
        return (self.directory.is_dir(), tuple(sig))

    def load(self) -> LoadResult:
        """Read every manifest file; accept good files, keep the last good version of bad ones."""
        problems: list[ManifestProblem] = []
        if not self.directory.is_dir():
            # A folder that vanished (or is being replaced) is an error, not "everything was deleted".
            kept = "; the last good state stays in force" if self._good else ""
            problems.append(
                ManifestProblem(str(self.directory), 0, "", f"no manifest folder for cluster {self.cluster}{kept}")
            )
            loaded = LoadResult(snapshot=self._last.snapshot, problems=tuple(problems))
            self._last = loaded
            return loaded
        seen_files: set[str] = set()
        for path in self.files():
            name = str(path)
            seen_files.add(name)
            try:
                data = path.read_bytes()
            except OSError as exc:
                problems.append(ManifestProblem(name, 0, "", f"cannot read: {exc.strerror or exc}"))
                continue
            digest = hashlib.sha256(data).hexdigest()
            good = self._good.get(name)
            if good is not None and good.digest == digest:
                problems.extend(good.problems)
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                result = _FileResult(digest, (), (ManifestProblem(name, 0, "", f"not UTF-8 text: {exc.reason}"),))
            else:
                objs, probs = parse_file(text, file=name, cluster=self.cluster)
                result = _FileResult(digest, tuple(objs), tuple(probs))
            problems.extend(result.problems)
            if result.ok:
                self._good[name] = result
            elif good is not None:
                problems.append(
                    ManifestProblem(name, 0, "", "rejected; the last good version of this file stays in force", WARNING)
                )
            else:
                problems.append(ManifestProblem(name, 0, "", "rejected; nothing from this file is in force", WARNING))
        for name in [n for n in self._good if n not in seen_files]:
            del self._good[name]  # a deleted file takes its objects with it

        seen: dict[tuple[str, str, str, str], str] = {}
        ordered: list[Any] = []
        for name in sorted(self._good):
            for identity, obj in self._good[name].objects:
                if identity in seen:
                    _, kind, ns, obj_name = identity
                    problems.append(
                        ManifestProblem(
                            name,
                            0,
                            "metadata.name",
                            f"{kind} {ns}/{obj_name} is also defined in {seen[identity]}; that one is used",
                            WARNING,
                        )
                    )
                    continue
                seen[identity] = name
                ordered.append(obj)
        core = assemble(ordered)
        for sl in core.orphan_slices:
            problems.append(
                ManifestProblem(
                    str(self.directory),
                    0,
                    "",
                    f"EndpointSlice {sl.key.namespace}/{sl.name} names Service {sl.key.name}, which is not defined",
                    WARNING,
                )
            )
        extras = tuple(
            o for o in ordered if not isinstance(o, Service | ServiceExport | EndpointSlice | ExternalNameService)
        )
        snapshot = ClusterSnapshot(
            cluster=self.cluster,
            services=core.services,
            exports=core.exports,
            unsupported=core.unsupported,
            extras=extras,
            version=_digest((n, self._good[n].digest) for n in sorted(self._good)),
        )
        loaded = LoadResult(snapshot=snapshot, problems=tuple(problems))
        self._last = loaded
        return loaded

    async def watch(self, *, interval: float = 1.0, max_polls: int | None = None) -> AsyncIterator[LoadResult]:
        """Yield the first load, then a new result whenever the accepted content or the problems change.

        Polls file names, sizes and mtimes every ``interval`` seconds (in a thread) and reloads only when they
        changed. Stops after ``max_polls`` polls if given; otherwise runs until cancelled.
        """
        sig = await asyncio.to_thread(self.signature)
        result = await asyncio.to_thread(self.load)
        _log_problems(self.cluster, result)
        yield result
        polls = 0
        while max_polls is None or polls < max_polls:
            await asyncio.sleep(interval)
            polls += 1
            new_sig = await asyncio.to_thread(self.signature)
            if new_sig == sig:
                continue
            sig = new_sig
            previous = result
            result = await asyncio.to_thread(self.load)
            if result.snapshot.version != previous.snapshot.version or result.problems != previous.problems:
                log.info(
                    "manifests_changed cluster=%s version=%s services=%d exports=%d problems=%d",
                    self.cluster,
                    result.snapshot.version,
                    len(result.snapshot.services),
                    len(result.snapshot.exports),
                    len(result.problems),
                )
                _log_problems(self.cluster, result)
                yield result


def _log_problems(cluster: ClusterId, result: LoadResult) -> None:
    for p in result.problems:
        level = logging.ERROR if p.severity == ERROR else logging.WARNING
        log.log(level, "manifest_%s cluster=%s %s", p.severity, cluster, p)


def _digest(parts: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, digest in parts:
        h.update(os.fsencode(name) + b"\0" + digest.encode() + b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# A whole clusterset from manifests (local runs, ``meshfed dns --clusterset``)


@dataclass(frozen=True, slots=True)
class ClusterSetState:
    """Every member's snapshot, the problems found, and the MCS derivation over all of them."""

    clusterset: ClusterSet
    snapshots: Mapping[ClusterId, ClusterSnapshot]
    problems: tuple[ManifestProblem, ...]
    mcs: McsResult

    def registry(self, local: ClusterId | str) -> Registry:
        """A Registry as cluster ``local`` would see it when every member's manifests are local knowledge:
        every shard, exports with their conditions, the members and the derived imports."""
        reg = Registry(local=cluster_id(local))
        for cid in sorted(self.snapshots):
            snap = self.snapshots[cid]
            reg = reg.with_shard(cid, snap.services.values(), self.mcs.exports_with_conditions(snap.exports.values()))
        return reg.with_catalog(clusters={c.id: c for c in self.clusterset.clusters}, imports=self.mcs.imports)


def derive_clusterset(clusterset: ClusterSet, snapshots: Mapping[ClusterId, ClusterSnapshot]) -> McsResult:
    """Run the MCS derivation over the members' snapshots with the clusterset's CIDR."""
    return derive(
        {c: s.services for c, s in snapshots.items()},
        [e for s in snapshots.values() for e in s.exports.values()],
        cidr=clusterset.cidr,
        unsupported={c: s.unsupported for c, s in snapshots.items()},
    )


def load_clusterset_manifests(clusterset: ClusterSet) -> ClusterSetState:
    """Load every member's manifests once (a fresh source per member) and derive the imports."""
    snapshots: dict[ClusterId, ClusterSnapshot] = {}
    problems: list[ManifestProblem] = []
    for info in clusterset.clusters:
        result = ManifestSource.for_cluster(clusterset, info.id).load()
        snapshots[info.id] = result.snapshot
        problems.extend(result.problems)
    return ClusterSetState(
        clusterset=clusterset,
        snapshots=snapshots,
        problems=tuple(problems),
        mcs=derive_clusterset(clusterset, snapshots),
    )
