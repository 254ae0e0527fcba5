"""``meshfed federation``: the help promises what exists (serve, members, remove), and members/remove say what to
do when there is no run to ask (the working path runs in tests/docs/test_docs_run.py against a real run)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from meshfed.cli import cli


def test_help_lists_the_commands_it_promises() -> None:
    result = CliRunner().invoke(cli, ["federation", "--help"])
    assert result.exit_code == 0
    for name in ("serve", "members", "remove"):
        assert f"  {name}" in result.output
    assert "inspect" not in result.output


def test_members_and_remove_without_a_run(tmp_path: Path) -> None:
    from tests.meshfed.test_down import stopped_run

    for args in (["members"], ["remove", "north"]):
        result = CliRunner().invoke(cli, ["federation", *args, "--run-dir", str(tmp_path / "none")])
        assert result.exit_code != 0 and "meshfed up" in result.output
        result = CliRunner().invoke(cli, ["federation", *args, "--run-dir", str(stopped_run(tmp_path / args[0]))])
        assert result.exit_code != 0 and "was stopped" in result.output
    result = CliRunner().invoke(cli, ["federation", "remove", "North", "--federation", "https://127.0.0.1:1"])
    assert result.exit_code != 0 and "RFC 1123" in result.output
