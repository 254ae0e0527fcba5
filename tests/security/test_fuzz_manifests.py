"""Fuzzing the manifest converters (issue 10, "the suite that keeps it fixed"): whatever a manifest holds, the
converters answer with a value or with the discovery domain's own error naming the field, never anything else;
``parse_file`` turns any text into objects and problems without raising.

Inputs: every document of the demo clusters' manifests, mutated (a value replaced, a key dropped or added), and
arbitrary JSON values under every registered (apiVersion, kind). Bounded for CI (modest ``max_examples``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import discovery.authz
import discovery.policy
from discovery.convert import CONVERTERS, convert
from discovery.manifests import parse_file
from discovery.model import ClusterId, DiscoveryError
from tests.security.fuzzkit import JSON, mutated

assert discovery.authz and discovery.policy  # their converters are in discovery.convert.CONVERTERS

CLUSTER = ClusterId("east")
DEMO = Path(__file__).resolve().parents[2] / "clusters" / "demo"
SEEDS: list[Any] = [doc for path in sorted(DEMO.glob("*/*.yaml"))
                    for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, dict)]
KINDS = sorted(CONVERTERS)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _convert(obj: Any) -> None:
    try:
        convert(obj, cluster=CLUSTER)
    except DiscoveryError:
        pass  # the domain's own error (ConversionError names the field); anything else fails the test


def test_the_seeds_cover_every_kind_and_convert() -> None:
    assert {d["kind"] for d in SEEDS} >= {k for _, k in KINDS}
    for doc in SEEDS:
        convert(doc, cluster=CLUSTER)


@FUZZ
@given(obj=mutated(SEEDS))
def test_mutated_demo_manifests_raise_only_discovery_errors(obj: Any) -> None:
    _convert(obj)


@FUZZ
@given(kind=st.sampled_from(KINDS), metadata=JSON, spec=JSON, rest=st.dictionaries(st.text(max_size=8), JSON,
                                                                                      max_size=3))
def test_arbitrary_objects_of_every_kind_raise_only_discovery_errors(kind: tuple[str, str], metadata: Any,
                                                                     spec: Any, rest: dict[str, Any]) -> None:
    _convert({**rest, "apiVersion": kind[0], "kind": kind[1], "metadata": metadata, "spec": spec,
              "ports": spec, "endpoints": spec})


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(st.text(max_size=400),
                      st.lists(mutated(SEEDS), min_size=1, max_size=3).map(
                          lambda docs: yaml.safe_dump_all(docs, allow_unicode=True)),
                      st.sampled_from(["{", "- [", "a: b: c", "!!python/object:os.system x", "\t- x", "*a", "&a [*a]",
                                       "---\n" * 3, "apiVersion: v1\nkind: List\nitems: 7\n"])))
def test_parse_file_never_raises(text: str) -> None:
    _objects, problems = parse_file(text, file="fuzz.yaml", cluster=CLUSTER)
    assert all(p.file == "fuzz.yaml" for p in problems)
