"""Run the shell blocks of a documentation page as written (tests/docs/test_docs_run.py).

The convention, for whoever writes a page:

- Every fenced block whose info string is ``sh``, ``bash`` or ``shell`` runs, in page order, with ``bash -e -o
  pipefail`` in a workspace that holds a copy of ``clusters/`` (so ``meshfed export`` edits the copy) and a
  ``meshfed`` (and ``.venv/bin/meshfed``, ``python``) that run this checkout. Other fences (``text``, ``yaml``, none)
  never run: use them for output and for sketches.
- An HTML comment on the line(s) right before the fence changes that block::

      <!-- docs-test: skip REASON -->     not run (REASON is required: a real cluster, a one-time setup ...)
      <!-- docs-test: exit=N -->          expected to exit N (the first failing command's status), not 0
      <!-- docs-test: at-end -->          run after every page (``meshfed down``)

- Placeholders are ``<...>`` words the harness knows how to fill from the running local run (:func:`placeholders`):
  ``<east dns port>``, ``<sleep-east outbound>`` (HOST:PORT), ``<east admin>`` and so on. A block that still holds
  an unknown ``<...>`` after filling fails, naming it, so a new placeholder is added here or the block is skipped.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshfed.runstate import RunState

RUNNABLE = {"sh", "bash", "shell"}
_FENCE = re.compile(r"^(\s*)```+\s*([\w-]*)")
_MARK = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
_PLACEHOLDER = re.compile(r"<([a-z][a-z0-9 ._-]*)>", re.I)


@dataclass(frozen=True, slots=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    text: str
    skip: str = ""  # the reason, when skipped
    exit_code: int = 0
    at_end: bool = False

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The shell blocks of a Markdown page with their markers (pure)."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, info = m.group(1), m.group(2).lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        if info not in RUNNABLE:
            continue
        marks: list[str] = []
        j = start - 1
        while j >= 0 and (lines[j].strip() == "" or _MARK.search(lines[j])):
            if lines[j].strip():
                marks.append(_MARK.search(lines[j]).group(1))  # type: ignore[union-attr]
            j -= 1
            if lines[j + 1].strip() == "" and marks:
                break
        skip, code, at_end = "", 0, False
        for mark in marks:
            if mark.startswith("skip"):
                skip = mark[4:].strip() or "?"
                assert skip != "?", f"{path.name}:{start + 1}: 'docs-test: skip' needs a reason"
            elif mark.startswith("exit="):
                code = int(mark[5:])
            elif mark == "at-end":
                at_end = True
            else:
                raise AssertionError(f"{path.name}:{start + 1}: unknown docs-test marker {mark!r}")
        out.append(Block(page=path.name, line=start + 1, text="\n".join(body) + "\n", skip=skip, exit_code=code,
                         at_end=at_end))
    return out


def placeholders(state: RunState) -> dict[str, str]:
    """Every placeholder a page may use, from a local run's state."""
    out: dict[str, str] = {}
    for name, c in state.clusters.items():
        cp = c.controlplane
        for key, value in (("dns", cp.dns), ("xds", cp.xds), ("admin", cp.admin)):
            out[f"{name} {key}"] = value
            out[f"{name} {key} port"] = value.rpartition(":")[2]
        out[f"{name} gateway admin"] = c.gateway.admin
        for w in c.workloads:
            out[f"{w.name} outbound"] = w.outbound
            out[f"{w.name} admin"] = w.sidecar_admin
    out["federation url"] = state.federation.url if state.federation is not None else ""
    return out


def fill(block: Block, values: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        return values.get(m.group(1), m.group(0))

    text = _PLACEHOLDER.sub(one, block.text)
    left = [m.group(0) for m in _PLACEHOLDER.finditer(text)]
    assert not left, (f"{block.where}: placeholder(s) {', '.join(left)} unknown to tests/docs/docrun.py "
                      f"(known: {', '.join(sorted(values))})")
    return text


def run(block: Block, text: str, *, cwd: Path, env: Mapping[str, str], timeout: float = 300) -> str:
    """Run one block; assert its exit status; return what it printed (for the failure message of a later check)."""
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=cwd, env=dict(env), capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == block.exit_code, (
        f"{block.where}: the block exited {done.returncode}, the page expects {block.exit_code}\n--- block\n{text}"
        f"--- stdout\n{done.stdout[-4000:]}--- stderr\n{done.stderr[-4000:]}")
    return done.stdout
