"""``meshfed diagnose`` hop 8 on the demo clusterset's policies (west's ratings: ALLOW east's sleep, DENY /admin)."""

from __future__ import annotations

from pathlib import Path

from meshfed.authz_check import policy_evidence, policy_hop

DEMO = Path(__file__).resolve().parents[2] / "clusters" / "demo"
SLEEP = "spiffe://demo.meshfed.local/ns/default/sa/sleep"


def test_demo_ratings_allows_easts_sleep_only() -> None:
    found, error = policy_evidence(DEMO, "ratings.default", ["west"])
    assert error == "" and set(found) == {"west"}
    west = found["west"]
    assert [p.policy_id for p in west.allow] == ["default.ratings-allow-east-sleep"]
    assert [p.policy_id for p in west.deny] == ["default.ratings-deny-admin"]
    assert west.port == 9080
    status, detail, _ = policy_hop(found, principal=SLEEP, caller="east", service="ratings.default")
    assert status == "ok" and "allowed by default.ratings-allow-east-sleep" in detail
    status, detail, step = policy_hop(found, principal=SLEEP, caller="west", service="ratings.default")
    assert status == "FAIL" and "no ALLOW policy matches" in detail and "default.ratings-allow-east-sleep" in detail
    assert "meshfed-authz" in step


def test_unprotected_service_and_unreadable_clusterset_skip() -> None:
    found, error = policy_evidence(DEMO, "reviews.default", ["east", "west"])
    assert error == "" and set(found) == {"east", "west"}
    status, detail, _ = policy_hop(found, principal=SLEEP, caller="east", service="reviews.default")
    assert status == "skipped" and "no AuthorizationPolicy selects reviews.default" in detail
    found, error = policy_evidence(DEMO / "missing", "ratings.default", ["west"])
    assert found == {} and error
    assert policy_hop(found, principal=SLEEP, caller="east", service="ratings.default", error=error)[0] == "skipped"
