"""``meshfed dashboard`` in a real headless Chromium (Debian chromium + chromedriver, through Selenium) over a real
local run (``meshfed up --scrape-interval 1``) whose real Prometheus scrapes with the configuration meshfed
rendered.

In order, on one run: the page shows both clusters and the edges the catalog allows; traffic sent through east's
sidecar to west's ratings appears on that edge (requests/s from the recording rules, over Prometheus's HTTP API);
clicking a service shows its diagnose hops, every one ok; after ``meshfed fault stop west/eastwest-gateway`` the
gateway and the edge show the failure, the Problems list names the gateway, and diagnose highlights the failing
hop. Screenshots go to the test's tmp dir.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshfed import local, procs
from meshfed import prometheus as prom
from tests.e2e.test_local_run import detached_run, meshfed, state_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
RATINGS = "ratings.default"  # exported by west only: every call from east crosses clusters
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1500,1300")


def _missing() -> str:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is not installed (Debian chromium, chromium-driver)"
    if prom.binary() is None:
        return "prometheus is not installed (Debian prometheus)"
    if importlib.util.find_spec("selenium") is None:
        return "the selenium package is not installed"
    return ""


if _missing():
    pytest.skip(_missing(), allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def wait(driver: Any, what: str, check: Callable[[Any], Any], *, timeout: float = 60) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.25,
                         ignored_exceptions=(StaleElementReferenceException,)).until(check, message=what)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with detached_run(tmp_path_factory.mktemp("meshfed-dashboard") / "run", "--network", "loopback",
                      "--scrape-interval", "1", timeout=300) as run_dir:
        yield run_dir


@pytest.fixture(scope="module")
def dashboard(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = local.free_port()
    logs = tmp_path_factory.mktemp("dashboard-log") / "dashboard.log"
    proc = procs.spawn([sys.executable, "-m", "meshfed", "dashboard", "--run-dir", str(run), "--listen",
                        f"127.0.0.1:{port}", "--refresh", "1"], log_path=logs)
    url = f"http://127.0.0.1:{port}"
    try:
        local.wait_until("dashboard", lambda: local.http_get(f"{url}/api/view", timeout=30)[0] == 200, timeout=90,
                         pids=[proc.pid], logs=[str(logs)])
        yield url
    finally:
        procs.stop(proc.pid)


@pytest.fixture(scope="module")
def browser(dashboard: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path_factory.mktemp("chromedriver") / "log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(dashboard + "/")
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


#: What the page shows, read in one go inside the page (it is redrawn on every update, so elements found one by one
#: may be replaced between two reads).
PAGE_STATE = """
const q = (sel, root) => Array.from((root || document).querySelectorAll(sel));
return {
  clusters: q("g.cluster").map(g => ({name: g.dataset.cluster, lease: g.dataset.lease,
                                      exports: q(".service.export", g).map(t => t.dataset.service)})),
  gateways: Object.fromEntries(q("g.gateway").map(g => [g.dataset.cluster, g.dataset.state])),
  controlplanes: Object.fromEntries(q("g.controlplane").map(g => [g.dataset.cluster, g.dataset.state])),
  edges: q("g.edge-group").map(g => ({source: g.dataset.source, destination: g.dataset.destination,
                                      service: g.dataset.service, state: g.dataset.state,
                                      label: g.querySelector("text.edge-label").textContent})),
  problems: q("#problems li.problem").map(li => li.textContent),
  live: document.getElementById("live").textContent,
};
"""


def page(driver: Any) -> dict[str, Any]:
    state: dict[str, Any] = driver.execute_script(PAGE_STATE)
    return state


def edge(state: dict[str, Any], source: str, destination: str, service: str) -> dict[str, Any] | None:
    return next((e for e in state["edges"] if (e["source"], e["destination"], e["service"])
                 == (source, destination, service)), None)


def api_view(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/api/view", timeout=30) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


class Traffic:
    """East's sleep calling west's ratings through its sidecar, one request after another (bounded, stoppable)."""

    def __init__(self, run: Path) -> None:
        self.client = local.client_of(state_of(run), "east")
        self.state = state_of(run)
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                local.request(self.state, self.client, f"{RATINGS}.svc.clusterset.local", timeout=2)
            except OSError:
                pass
            self.sent += 1
            time.sleep(0.05)


def test_page_shows_both_clusters_their_gateways_and_edges(run: Path, browser: Any, shots: Path) -> None:
    wait(browser, "both clusters drawn, live", lambda d: {c["name"] for c in page(d)["clusters"]} == {"east", "west"}
         and page(d)["live"] == "live")
    shown = page(browser)
    assert shown["gateways"] == {"east": "up", "west": "up"}
    assert shown["controlplanes"] == {"east": "up", "west": "up"}
    assert {c["name"]: c["lease"] for c in shown["clusters"]} == {"east": "held", "west": "held"}
    assert edge(shown, "east", "west", RATINGS) is not None  # east imports ratings, only west exports it
    assert edge(shown, "west", "east", "reviews.default") is not None  # both export reviews
    assert edge(shown, "west", "east", RATINGS) is None  # nobody in east serves ratings
    west = next(c for c in shown["clusters"] if c["name"] == "west")
    assert RATINGS in west["exports"]
    browser.save_screenshot(str(shots / "01-loaded.png"))


def test_prometheus_runs_the_config_meshfed_rendered_and_scrapes_every_target(run: Path) -> None:
    state = state_of(run)
    url = state.prometheus.url
    with urllib.request.urlopen(f"{url}/api/v1/status/config", timeout=10) as resp:
        loaded = yaml.safe_load(json.loads(resp.read())["data"]["yaml"])
    rendered = yaml.safe_load(Path(state.prometheus.config).read_text())
    assert [j["job_name"] for j in loaded["scrape_configs"]] == [j["job_name"] for j in rendered["scrape_configs"]]
    expected = {f"{t.role}/{t.labels.get('cluster', '')}/{t.labels.get('workload', '')}"
                for t in prom.run_targets(state)}
    local.wait_until("every target scraped", lambda: prom.targets_up(url) == dict.fromkeys(expected, True),
                     timeout=60)
    # the federation's plain metrics listener serves /metrics and nothing else of its API
    metrics = state.federation.metrics
    assert local.http_get(f"http://{metrics}/metrics")[0] == 200
    assert local.http_get(f"http://{metrics}/v1/catalog")[0] == 404
    assert local.http_get(f"http://{metrics}/healthz")[0] == 404


def test_traffic_appears_on_the_edge(run: Path, dashboard: str, browser: Any, shots: Path) -> None:
    url = state_of(run).prometheus.url
    with Traffic(run) as traffic:
        wait(browser, "east -> west ratings carrying traffic",
             lambda d: (edge(page(d), "east", "west", RATINGS) or {}).get("state") == "ok", timeout=90)
        label = (edge(page(browser), "east", "west", RATINGS) or {})["label"]
        assert "req/s" in label and "no traffic" not in label and "p99" in label
        browser.save_screenshot(str(shots / "02-traffic.png"))
        ours = next(e for e in api_view(dashboard)["edges"]
                    if (e["source"], e["destination"], e["service"]) == ("east", "west", RATINGS))
        assert ours["requests_per_s"] > 0 and ours["error_ratio"] == 0
        recorded = prom.query(url, f'{prom.RULE_REQUESTS}{{source_cluster="east",destination_cluster="west"}}')
        assert any(float(r["value"][1]) > 0 and r["metric"]["destination_service"].startswith(RATINGS)
                   for r in recorded)
    assert traffic.sent > 0


def _diagnose(browser: Any, service: str, caller: str) -> list[tuple[str, str, str]]:
    for _ in range(20):  # the region is redrawn on every update: a click may meet a replaced element
        try:
            browser.find_element(By.CSS_SELECTOR, f'text.service[data-service="{service}"]').click()
            break
        except (StaleElementReferenceException, WebDriverException):
            time.sleep(0.2)
    wait(browser, "diagnose panel", lambda d: d.find_element(By.ID, "diagnose").is_displayed())
    assert browser.find_element(By.ID, "diagnose-from").get_attribute("value") == caller
    wait(browser, "diagnose finished", lambda d: d.find_element(By.ID, "diagnose-summary").get_attribute(
        "data-state") in ("ok", "failing", "error"), timeout=90)
    assert browser.find_element(By.ID, "diagnose-summary").get_attribute("data-state") != "error", \
        browser.find_element(By.ID, "diagnose-summary").text
    return [(r.get_attribute("data-hop"), r.get_attribute("data-status"), r.get_attribute("class"))
            for r in browser.find_elements(By.CSS_SELECTOR, "#hops tr.hop")]


def test_clicking_a_service_shows_its_diagnose_hops(run: Path, browser: Any, shots: Path) -> None:
    hops = _diagnose(browser, RATINGS, "east")
    assert [h[0] for h in hops][:5] == ["export", "import", "dns", "xds", "gateway"]
    assert all(status in ("ok", "skipped") for _, status, _ in hops), hops
    assert not browser.find_elements(By.CSS_SELECTOR, "#hops tr.hop.failing")
    browser.save_screenshot(str(shots / "03-diagnose.png"))


def test_a_stopped_gateway_shows_on_the_gateway_the_edge_and_the_problems(run: Path, browser: Any,
                                                                           shots: Path) -> None:
    done = meshfed("fault", "stop", "west/eastwest-gateway", "--run-dir", str(run))
    assert done.returncode == 0, done.stdout + done.stderr
    with Traffic(run):
        wait(browser, "west's gateway down", lambda d: page(d)["gateways"].get("west") == "down")
        wait(browser, "east -> west ratings failing",
             lambda d: (edge(page(d), "east", "west", RATINGS) or {}).get("state") == "failing")
        wait(browser, "the problem listed", lambda d: any("west/eastwest-gateway" in p for p in page(d)["problems"]))
        assert page(browser)["gateways"]["east"] == "up"
        browser.save_screenshot(str(shots / "04-gateway-down.png"))
        hops = _diagnose(browser, RATINGS, "east")
    failing = [h for h in hops if h[1] == "FAIL"]
    assert failing and all("failing" in cls for _, _, cls in failing), hops
    assert "gateway" in [h[0] for h in failing], hops
    browser.save_screenshot(str(shots / "05-diagnose-failing.png"))
    print(f"screenshots in {shots}")
