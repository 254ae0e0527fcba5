"""Docs that cannot drift (issue 18): the shell blocks of five pages run as written against one local run.

One workspace (a copy of ``clusters/`` and a ``meshfed`` on PATH that runs this checkout) and one ``meshfed up
--detach`` (the quickstart's own block starts it; a page run alone starts it the same way) serve every page, in the
order a newcomer reads them. The convention for blocks that must not run, expected exit codes and placeholders is in
tests/docs/docrun.py. Blocks marked ``at-end`` (the quickstart's ``meshfed down``) run in the last test, which also
checks what the walk found after ``down``: status says the run was stopped, a second ``down`` says nothing runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshfed import local, procs
from tests.docs import docrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
PAGES = ["quickstart.md", "exporting.md", "troubleshooting.md", "operations.md", "trust.md"]
AT_END: list[docrun.Block] = []


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.run_dir = root / local.DEFAULT_RUN_DIR
        shutil.copytree(REPO / "clusters", root / "clusters")
        bindir = root / "bin"
        bindir.mkdir()
        wrapper = bindir / "meshfed"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m meshfed \"$@\"\n")
        wrapper.chmod(0o755)
        (bindir / "python").symlink_to(sys.executable)
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "meshfed").symlink_to(wrapper)
        self.env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
                    "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}

    def up(self) -> bool:
        return bool(self.run_dir.joinpath(local.STATE_FILE).exists()
                    and local.running(local.read_state(self.run_dir)))

    def ensure_up(self) -> None:
        if self.up():
            return
        done = subprocess.run(["meshfed", "up", "--detach"], cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert done.returncode == 0, f"meshfed up --detach failed:\n{done.stdout}\n{done.stderr}"

    def run_page(self, page: str) -> None:
        path = REPO / "docs" / page
        found = docrun.blocks(path)
        assert found, f"{page} has no shell block"
        for block in found:
            if block.skip:
                continue
            if block.at_end:
                AT_END.append(block)
                continue
            values = docrun.placeholders(local.read_state(self.run_dir)) if self.up() else {}
            docrun.run(block, docrun.fill(block, values), cwd=self.root, env=self.env)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    ws = Workspace(tmp_path_factory.mktemp("od-docs"))
    try:
        yield ws
    finally:
        local.stop_run(ws.run_dir)
        for p in (s.processes if (s := local.read_state(ws.run_dir, missing_ok=True)) else ()):
            procs.stop(p.pid)


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_written(workspace: Workspace, page: str) -> None:
    if page != "quickstart.md":
        workspace.ensure_up()
    workspace.run_page(page)
    assert workspace.up(), f"{page} left no run up (only an at-end block may stop it)"


def test_at_end_blocks_and_what_follows_down(workspace: Workspace) -> None:
    workspace.ensure_up()
    assert AT_END, "quickstart.md's 'meshfed down' should be marked at-end"
    # operations.md's removal, on a real member (west's control plane registers it again afterwards)
    members = subprocess.run(["meshfed", "federation", "members", "-o", "json"], cwd=workspace.root,
                             env=workspace.env, capture_output=True, text=True, timeout=60, check=False)
    assert members.returncode == 0, members.stderr
    assert {m["cluster"] for m in json.loads(members.stdout)["members"]} >= {"east", "west"}
    removed = subprocess.run(["meshfed", "federation", "remove", "west"], cwd=workspace.root, env=workspace.env,
                             capture_output=True, text=True, timeout=60, check=False)
    assert removed.returncode == 0 and "removed west from the federation" in removed.stdout, removed.stderr
    for block in AT_END:
        docrun.run(block, block.text, cwd=workspace.root, env=workspace.env)
    assert not workspace.up()
    again = subprocess.run(["meshfed", "down"], cwd=workspace.root, env=workspace.env, capture_output=True,
                           text=True, timeout=60, check=False)
    assert again.returncode == 0 and "nothing is running" in again.stderr + again.stdout
    status = subprocess.run(["meshfed", "status"], cwd=workspace.root, env=workspace.env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert status.returncode == 2 and "was stopped" in status.stderr + status.stdout


def test_marker_and_placeholder_convention(tmp_path: Path) -> None:
    """The harness's own rules: skip needs a reason, unknown placeholders are named, other fences never run."""
    page = tmp_path / "p.md"
    page.write_text("x\n\n<!-- docs-test: skip needs a real cluster -->\n```sh\nfalse\n```\n\n```text\nno\n```\n\n"
                    "<!-- docs-test: exit=1 -->\n```sh\nmeshfed status <east dns port> <nowhere>\n```\n")
    found = docrun.blocks(page)
    assert [(b.line, b.skip, b.exit_code) for b in found] == [(4, "needs a real cluster", 0), (13, "", 1)]
    with pytest.raises(AssertionError, match="<nowhere>"):
        docrun.fill(found[1], {"east dns port": "53"})
