"""A local run's state as one typed value (meshfed.runstate): the files real runs wrote decode and encode back to the
same document, and a state.json that is not a run state is an error naming the file and the offending path."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from meshfed import local, runstate
from meshfed.cli import cli
from meshfed.runstate import RunState

RUNSTATES = Path(__file__).parent / "runstates"
# Written by 'meshfed up' before this module existed (tokens replaced): a netns run after 'meshfed restart
# east/controlplane' and 'meshfed fault partition west', and a supervised loopback run after 'meshfed fault stop
# sleep-east'.
FILES = sorted(RUNSTATES.glob("*.json"))


def doc(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RUNSTATES / name).read_text())
    return data


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_a_state_written_by_a_real_run_decodes_and_encodes_back_unchanged(path: Path) -> None:
    data = json.loads(path.read_text())
    state = runstate.decode(data)
    assert runstate.encode(state) == data


def test_the_typed_state_holds_what_the_run_recorded() -> None:
    netns = runstate.decode(doc("netns-restarted-partitioned.json"))
    assert netns.network.mode == "netns" and netns.network.created and netns.network.partitions == {"west": ()}
    east = netns.clusters["east"]
    restarted = netns.process("east/controlplane")
    assert restarted is not None and restarted.restarts == 1 and east.controlplane.pid == restarted.pid
    client = local.client_of(netns, "east")
    assert client.netns and client.pod_ip and client.outbound == "" and not client.service
    assert local.pod_of(netns, client.name) == client.netns
    grpc = [p for p in netns.processes if p.name.endswith("/grpc")]
    assert grpc and all(p.env and "GRPC_XDS_BOOTSTRAP" in p.env for p in grpc)
    loop = runstate.decode(doc("loopback-supervised-workload-stopped.json"))
    assert loop.network.mode == "loopback" and loop.network.plan is None
    assert [p.name for p in loop.processes if p.held] == ["east/sleep-east"]
    assert loop.processes[-1].name == local.SUPERVISOR
    assert local.client_of(loop, "west").outbound.startswith("127.0.0.1:")


def test_write_then_read_is_the_same_value_and_private(tmp_path: Path) -> None:
    state = runstate.decode(doc("loopback-supervised-workload-stopped.json"))
    run_dir = tmp_path / "run"
    local.write_state(run_dir, state)
    assert local.read_state(run_dir) == state
    assert os.stat(run_dir).st_mode & 0o777 == 0o700
    assert os.stat(run_dir / local.STATE_FILE).st_mode & 0o777 == 0o600


def test_a_pid_replaced_everywhere_it_was_recorded() -> None:
    state = runstate.decode(doc("netns-restarted-partitioned.json"))
    old = state.clusters["west"].gateway.pid
    assert old is not None
    moved = runstate.replace_pid(state, old, 424242)
    assert moved.clusters["west"].gateway.pid == 424242
    assert moved.clusters["east"] == state.clusters["east"]
    assert runstate.encode(moved) != runstate.encode(state)


def test_keys_written_only_sometimes_stay_out_of_the_json() -> None:
    state = runstate.decode(doc("loopback-supervised-workload-stopped.json"))
    w = runstate.encode(state)["clusters"]["east"]["workloads"][0]
    assert "netns" not in w and "pod_ip" not in w and "manifest_address" not in w
    bare = runstate.encode(RunState(clusterset="c", name="n", run_dir="r", trust_domain="t", started_at=1.0))
    assert set(bare) == {"clusterset", "name", "run_dir", "trust_domain", "started_at", "cwd", "processes",
                         "clusters", "network"}
    assert bare["network"] == {"mode": "loopback", "reason": ""}


@pytest.mark.parametrize(("change", "path", "message"), [
    (lambda d: d["clusters"]["east"]["gateway"].update(adress="x"), "clusters.east.gateway.adress", "unknown field"),
    (lambda d: d["processes"][0].update(pid="12"), "processes[0].pid", "expected an integer"),
    (lambda d: d["clusters"]["west"]["workloads"][0].pop("spiffe_id"), "clusters.west.workloads[0].spiffe_id",
     "missing"),
    (lambda d: d.update(network=[]), "network", "expected an object"),
    (lambda d: d["federation"].update(pid=None), "federation.pid", "must not be null"),
])
def test_a_state_that_is_not_a_run_state_names_the_path(tmp_path: Path, change: Any, path: str, message: str
                                                         ) -> None:
    data = doc("netns-restarted-partitioned.json")
    change(data)
    with pytest.raises(runstate.RunStateError) as err:
        runstate.decode(data)
    assert f"{path}: {message}" in str(err.value)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / local.STATE_FILE).write_text(json.dumps(data))
    with pytest.raises(local.LocalRunError) as err2:
        local.read_state(run_dir)
    assert str(run_dir / local.STATE_FILE) in str(err2.value) and path in str(err2.value)


def test_a_missing_or_corrupt_state_file(tmp_path: Path) -> None:
    assert local.read_state(tmp_path / "none", missing_ok=True) is None
    with pytest.raises(local.LocalRunError, match=r"no local run in .*meshfed up"):
        local.read_state(tmp_path / "none")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / local.STATE_FILE).write_text('{"clusters": ')
    with pytest.raises(local.LocalRunError, match="is not valid JSON"):
        local.read_state(run_dir)
    for args, rest in ((["status"], []), (["down"], []), (["restart", "federation"], []),
                       (["exec", "sleep-east"], ["--", "true"])):
        result = CliRunner().invoke(cli, [*args, "--run-dir", str(run_dir), *rest])
        assert result.exit_code != 0 and "is not valid JSON" in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_the_runner_builds_frozen_values() -> None:
    state = runstate.decode(doc("loopback-supervised-workload-stopped.json"))
    with pytest.raises(AttributeError):
        state.clusters["east"].gateway.pid = 1  # type: ignore[misc]
    changed = state.update_cluster("east", lambda c: c.with_workload("sleep-east", sidecar_pid=7))
    assert changed.clusters["east"].workload("sleep-east").sidecar_pid == 7  # type: ignore[union-attr]
    assert state.clusters["east"].workload("sleep-east") != changed.clusters["east"].workload("sleep-east")
    assert replace(changed, ready_at=None).ready_at is None
