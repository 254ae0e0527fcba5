"""The scrape configuration and recording rules meshfed renders (meshfed.prometheus), checked by Prometheus's own
``promtool`` (Debian package prometheus), and the rules evaluated by ``promtool test rules`` on made-up series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from meshfed import prometheus as prom
from tests.support.runstate import state_from

STATE = state_from({
    "federation": {"url": "https://127.0.0.1:9000", "metrics": "127.0.0.1:9001"},
    "clusters": {
        "east": {"controlplane": {"admin": "127.0.0.1:9100"}, "gateway": {"admin": "127.0.0.1:9101"},
                 "workloads": [{"name": "sleep-east", "sidecar_admin": "127.0.0.1:9102"}]},
        "west": {"controlplane": {"admin": "127.0.0.1:9200"}, "gateway": {"admin": "10.0.0.5:15000"},
                 "workloads": [{"name": "ratings-west-0", "sidecar_admin": "10.1.0.3:15000"}]},
    },
})


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    return tool


def test_every_metrics_endpoint_of_a_run_is_a_target_labelled_with_cluster_and_role() -> None:
    config = prom.render_config(prom.run_targets(STATE), scrape_interval=1.0)
    got = {(job["job_name"], job["metrics_path"], sc["targets"][0], tuple(sorted(sc["labels"].items())))
           for job in config["scrape_configs"] for sc in job["static_configs"]}
    assert got == {
        ("meshfed-federation", "/metrics", "127.0.0.1:9001", (("role", "federation"),)),
        ("meshfed-controlplane", "/metrics", "127.0.0.1:9100", (("cluster", "east"), ("role", "controlplane"))),
        ("meshfed-controlplane", "/metrics", "127.0.0.1:9200", (("cluster", "west"), ("role", "controlplane"))),
        ("meshfed-gateway", "/stats/prometheus", "127.0.0.1:9101", (("cluster", "east"), ("role", "gateway"))),
        ("meshfed-gateway", "/stats/prometheus", "10.0.0.5:15000", (("cluster", "west"), ("role", "gateway"))),
        ("meshfed-sidecar", "/stats/prometheus", "127.0.0.1:9102",
         (("cluster", "east"), ("role", "sidecar"), ("workload", "sleep-east"))),
        ("meshfed-sidecar", "/stats/prometheus", "10.1.0.3:15000",
         (("cluster", "west"), ("role", "sidecar"), ("workload", "ratings-west-0"))),
    }
    assert config["global"]["scrape_interval"] == "1s"
    assert prom.render_config([], scrape_interval=0.25)["global"]["scrape_interval"] == "250ms"


def test_rendered_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    tool = _promtool()
    config = prom.write_files(tmp_path, prom.run_targets(STATE), scrape_interval=2.0)
    done = subprocess.run([tool, "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 rules found" in done.stdout + done.stderr


def test_install_config_passes_promtool(tmp_path: Path) -> None:
    """Debian's Prometheus is built without Kubernetes service discovery, so promtool checks everything else
    (relabelling, paths, rules) with each job's kubernetes_sd_configs swapped for a static target."""
    tool = _promtool()
    (tmp_path / prom.RULES_FILE).write_text(prom.dump(prom.recording_rules()))
    doc = prom.kubernetes_config(cluster="east", namespace="meshfed-system", controlplane_port=15014,
                                 gateway_port=15090, federation_port=15014)
    assert all(j.pop("kubernetes_sd_configs") == [{"role": "pod"}] for j in doc["scrape_configs"])
    for job in doc["scrape_configs"]:
        job["static_configs"] = [{"targets": ["10.0.0.1:15090"]}]
    (tmp_path / "prometheus.yml").write_text(prom.dump(doc))
    done = subprocess.run([tool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [j["job_name"] for j in doc["scrape_configs"]] == [
        "meshfed-sidecar", "meshfed-gateway", "meshfed-controlplane", "meshfed-federation"]


def _series(labels: str) -> str:
    return f'envoy_meshfed_requests_total{{reporter="source",{labels}}}'


def test_recording_rules_give_rate_error_ratio_and_latency_per_edge(tmp_path: Path) -> None:
    """promtool evaluates the rules on series shaped as our sidecars export them: east -> west ratings gets 10
    requests/s of which 1/s is a 503, a destination sidecar's view of the same requests is not counted twice, and
    the latency histogram puts half the requests under 5 ms and all under 25."""
    tool = _promtool()
    rules = tmp_path / prom.RULES_FILE
    rules.write_text(prom.dump(prom.recording_rules()))
    edge = 'source_cluster="east",destination_cluster="west",destination_service="ratings.default.svc.clusterset.local"'
    hist = "envoy_meshfed_request_duration_milliseconds_bucket"
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [
                {"series": _series(f'{edge},response_code="200"'), "values": "0+135x8"},
                {"series": _series(f'{edge},response_code="503"'), "values": "0+15x8"},
                {"series": f'envoy_meshfed_requests_total{{reporter="destination",{edge},response_code="200"}}',
                 "values": "0+1000x8"},
                {"series": f'{hist}{{reporter="source",{edge},le="5"}}', "values": "0+75x8"},
                {"series": f'{hist}{{reporter="source",{edge},le="25"}}', "values": "0+150x8"},
                {"series": f'{hist}{{reporter="source",{edge},le="+Inf"}}', "values": "0+150x8"},
            ],
            "promql_expr_test": [
                {"expr": prom.RULE_REQUESTS, "eval_time": "2m",
                 "exp_samples": [{"labels": f"{prom.RULE_REQUESTS}{{{edge}}}", "value": 10}]},
                {"expr": prom.RULE_ERROR_RATIO, "eval_time": "2m",
                 "exp_samples": [{"labels": f"{prom.RULE_ERROR_RATIO}{{{edge}}}", "value": 0.1}]},
                {"expr": prom.RULE_P50, "eval_time": "2m",
                 "exp_samples": [{"labels": f"{prom.RULE_P50}{{{edge}}}", "value": 5}]},
                {"expr": f"{prom.RULE_P99} < 25 and {prom.RULE_P99} > 5", "eval_time": "2m",
                 "exp_samples": [{"labels": f"{prom.RULE_P99}{{{edge}}}", "value": 24.6}]},
            ],
        }],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    done = subprocess.run([tool, "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_edge_without_errors_has_ratio_zero_not_absent(tmp_path: Path) -> None:
    tool = _promtool()
    rules = tmp_path / prom.RULES_FILE
    rules.write_text(prom.dump(prom.recording_rules()))
    edge = 'source_cluster="west",destination_cluster="east",destination_service="details.default.svc.clusterset.local"'
    test = {"rule_files": [str(rules)], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [{"series": _series(f'{edge},response_code="200"'), "values": "0+30x8"}],
        "promql_expr_test": [{"expr": prom.RULE_ERROR_RATIO, "eval_time": "2m",
                              "exp_samples": [{"labels": f"{prom.RULE_ERROR_RATIO}{{{edge}}}", "value": 0}]}],
    }]}
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    done = subprocess.run([tool, "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_run_without_prometheus_says_so_and_carries_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshfed import local, status

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no prometheus to be found
    said: list[str] = []
    run = local.LocalRun(clusterset_dir=tmp_path, run_dir=tmp_path / "run", progress=said.append)
    run.state = STATE
    run._prometheus()
    assert run.run.prometheus is not None and run.run.prometheus.url is None
    assert any("prometheus is not installed" in line for line in said), said
    assert run.run.processes == ()  # nothing was started
    section = status.prometheus_section(local.read_state(tmp_path / "run"))
    assert section["url"] is None and "not installed" in section["reason"]
