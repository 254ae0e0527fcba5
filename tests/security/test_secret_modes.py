"""Issue 10 item 3: every file that holds a secret is 0600, in directories only its owner can enter (0700), after
``meshfed up`` and after ``meshfed install --render``.

A file holds a secret when it contains a private key (PEM ``PRIVATE KEY``) or one of the xDS bootstrap tokens the
run issued (every ``tokens.json`` lists them): that catches ``state.json`` (which records every workload's token),
the Envoy bootstraps and anything else a token is copied into, not only the files we expect.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshfed import local, procs
from meshfed.cli import cli

REPO = Path(__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _tokens(root: Path) -> set[str]:
    out: set[str] = set()
    for f in root.rglob("tokens.json"):
        out.update(json.loads(f.read_text()))
    return out


def secret_files(root: Path, tokens: set[str]) -> list[Path]:
    found = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if "PRIVATE KEY" in text or any(t in text for t in tokens):
            found.append(f)
    return found


def exposed(root: Path, files: list[Path]) -> list[str]:
    """Each secret file that is not 0600, or whose directory others may enter (not 0700)."""
    bad = []
    for f in files:
        if _mode(f) != 0o600:
            bad.append(f"{f.relative_to(root)}: mode {_mode(f):04o}")
        if _mode(f.parent) & 0o077:
            bad.append(f"{f.relative_to(root)}: directory {f.parent} is {_mode(f.parent):04o}")
    return sorted(set(bad))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run_dir = tmp_path_factory.mktemp("od-secrets") / "run"
    done = subprocess.run([sys.executable, "-m", "meshfed", "up", "clusters/demo", "--detach", "--run-dir",
                           str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    try:
        assert done.returncode == 0, f"meshfed up failed:\n{done.stdout}\n{done.stderr}"
        yield run_dir
    finally:
        local.stop_run(run_dir)
        for p in (s.processes if (s := local.read_state(run_dir, missing_ok=True)) else ()):
            procs.stop(p.pid)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_secret_of_a_local_run_is_0600_in_0700_directories(run: Path) -> None:
    tokens = _tokens(run)
    assert tokens, "the run issued no xDS tokens?"
    files = secret_files(run, tokens)
    names = {f.name for f in files}
    assert {"state.json", "tokens.json", "ca-key.pem", "root-key.pem"} <= names, names
    assert any(f.suffix == ".yaml" and f.parent.name == "envoy" for f in files), "no Envoy bootstrap found"
    assert exposed(run, files) == []
    assert _mode(run) == 0o700


def test_every_secret_of_install_render_is_0600_in_0700_directories(tmp_path: Path) -> None:
    out = tmp_path / "render"
    result = CliRunner().invoke(cli, ["install", str(REPO / "clusters" / "demo"), "--render", str(out), "--image",
                                      "registry.example/meshfed:test"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    files = secret_files(out, _tokens(out))
    assert any(f.parent.name == "east" for f in files) and any("key" in f.name for f in files), files
    assert exposed(out, files) == []


def test_the_checker_sees_a_readable_secret(tmp_path: Path) -> None:
    """The check above can fail: a key left 0644 in a 0755 directory is named twice."""
    (tmp_path / "d").mkdir(mode=0o755)
    key = tmp_path / "d" / "k.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o644)
    tmp_path.chmod(0o700)
    assert exposed(tmp_path, secret_files(tmp_path, set())) == ["d/k.pem: directory " + str(tmp_path / "d")
                                                                 + " is 0755", "d/k.pem: mode 0644"]
