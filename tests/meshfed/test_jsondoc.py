"""meshfed.jsondoc and the /status codec: strict decoding with errors naming the document and the field, and
encoding that writes back exactly the JSON decoded."""

from __future__ import annotations

from typing import Any

import pytest

from meshfed.controlplane.status import ControlPlaneStatus, FederationStatus, decode_status, encode_status
from meshfed.jsondoc import DocumentError, loads
from meshfed.rotation import ChainInfo, RotationReport


def _error(data: Any) -> str:
    with pytest.raises(DocumentError) as info:
        decode_status(data, what="status of east")
    return str(info.value)


def test_a_value_of_the_wrong_type_names_the_document_and_its_path() -> None:
    assert _error({"services": [{"service": "a.b"}, {"ready": "2"}]}) == \
        "status of east: services[1].ready: expected an integer, got a string"
    assert _error({"federation": {"connected": 1}}) == \
        "status of east: federation.connected: expected true or false, got an integer"
    assert _error({"proxy_errors": {"node": 3}}) == \
        "status of east: proxy_errors.node: expected a string, got an integer"
    assert _error([]) == "status of east: the document: expected an object, got a list"


def test_unknown_fields_and_nulls_are_refused_by_name() -> None:
    assert _error({"servces": []}) == "status of east: servces: unknown field"
    assert _error({"cluster": None}) == "status of east: cluster: must not be null"
    # None is a value only where the field may be None.
    assert decode_status({"rotation": None}).rotation is None


def test_fields_left_out_take_their_defaults_and_the_json_round_trips() -> None:
    assert decode_status({}) == ControlPlaneStatus()
    data = {"cluster": "east", "federation": {"configured": True, "connected": True, "revision": 4, "relists": 0,
                                              "reconnects": 1, "members": [], "heartbeat_error": None,
                                              "heartbeat_failing_since": None, "heartbeat_ok_at": "t"}}
    typed = decode_status(data)
    assert typed.federation.revision == 4 and typed.federation.heartbeat_error is None
    full = encode_status(typed)
    assert full["federation"] == data["federation"] and decode_status(full) == typed


def test_fields_present_only_in_some_states_are_left_out_of_the_json() -> None:
    """An unfederated control plane serves ``"federation": {"configured": false}`` and nothing else there; only
    the federation client's chain carries ``old_sessions_open``."""
    assert encode_status(ControlPlaneStatus())["federation"] == {"configured": False}
    assert encode_status(ControlPlaneStatus(federation=FederationStatus(configured=True)))["federation"][
        "heartbeat_error"] is None
    report = RotationReport(federation_client=ChainInfo(leaf_fingerprint="l", old_sessions_open=2),
                            xds_serving=ChainInfo(leaf_fingerprint="x"))
    encoded = encode_status(ControlPlaneStatus(rotation=report))["rotation"]
    assert encoded["federation_client"]["old_sessions_open"] == 2
    assert "old_sessions_open" not in encoded["xds_serving"]


def test_text_that_is_not_json_is_a_document_error() -> None:
    with pytest.raises(DocumentError, match=r"^state\.json: the document: not JSON"):
        loads(ControlPlaneStatus, "{", what="state.json")
