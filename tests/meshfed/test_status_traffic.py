"""The traffic section of `meshfed status` from Envoy Prometheus text (pure: no Envoy needed here; the e2e tests
scrape real ones)."""

from __future__ import annotations

from meshfed.status import sections
from meshfed.traffic import NO_ROUTE, Totals, is_error, pair_totals, table, traffic_rows

HEAD = "# TYPE envoy_meshfed_requests_total counter\n"


def series(reporter: str, src: str, dst: str, code: str, value: float, flags: str = "-") -> str:
    return (f'envoy_meshfed_requests_total{{reporter="{reporter}",source_cluster="{src}",destination_cluster="{dst}",'
            f'destination_service="ratings.default.svc.clusterset.local",response_code="{code}",'
            f'response_flags="{flags}",connection_security_policy="mutual_tls"}} {value}\n')


def test_pairs_sum_caller_side_series_and_count_5xx_and_resets_as_errors() -> None:
    east = HEAD + series("source", "east", "west", "200", 90) + series("source", "east", "west", "503", 6) + \
        series("source", "east", "west", "0", 4, "UF") + series("source", "east", "west", "403", 5) + \
        series("source", "east", "", "404", 2, "NR") + series("destination", "west", "east", "200", 1000)
    west = HEAD + series("source", "west", "east", "200", 10)
    totals = pair_totals([east, west, ""])
    assert totals == {("east", "west"): Totals(105, 10), ("east", NO_ROUTE): Totals(2, 0),
                      ("west", "east"): Totals(10, 0)}
    assert is_error("500") and is_error("0") and not is_error("403") and not is_error("200")


def test_rows_give_rate_over_the_window_and_totals() -> None:
    before = {("east", "west"): Totals(100, 10)}
    after = {("east", "west"): Totals(120, 11), ("west", "east"): Totals(4, 0)}
    rows = traffic_rows(before, after, 2.0)
    assert rows[0] == {"source_cluster": "east", "destination_cluster": "west", "requests": 120, "errors": 11,
                       "error_rate": round(11 / 120, 4), "rps": 10.0, "window_error_rate": 0.05, "window_s": 2.0}
    assert rows[1]["rps"] == 2.0 and rows[1]["window_error_rate"] == 0.0
    title, columns, body = table(rows)
    assert "2s" in title and columns[:3] == ["from", "to", "req/s"]
    assert body[0] == ["east", "west", "10.00", "5.0%", 120, 11, "9.2%"]
    # No request in the window: the window's error rate is unknown, not zero.
    assert traffic_rows(after, after, 1.0)[0]["window_error_rate"] is None


def test_status_sections_show_the_traffic_table() -> None:
    report = {"clusters": [], "services": [], "proxies": [], "problems": [],
              "trust": {"roots": [], "intermediates": [], "workload_certs": [], "phase": ""},
              "traffic": traffic_rows({}, {("east", "west"): Totals(3, 1)}, 1.0)}
    titles = [t for t, _, _ in sections(report)]
    assert any(t.startswith("Traffic") for t in titles), titles
