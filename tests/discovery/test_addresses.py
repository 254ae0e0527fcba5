"""HOST:PORT, parsed and written in one place (discovery.addresses)."""

from __future__ import annotations

import pytest

from discovery.addresses import HostPort, InvalidAddress, join_hostport, parse_hostport


def test_hosts_ipv6_in_brackets_and_defaults() -> None:
    assert parse_hostport("127.0.0.1:15010") == HostPort("127.0.0.1", 15010)
    assert parse_hostport("localhost:0") == HostPort("localhost", 0)
    assert parse_hostport("[::1]:5353") == HostPort("::1", 5353)
    assert parse_hostport(":8443", default_host="0.0.0.0") == HostPort("0.0.0.0", 8443)
    assert str(HostPort("::1", 53)) == "[::1]:53" == join_hostport("::1", 53)
    assert str(parse_hostport("10.0.0.1:80")) == "10.0.0.1:80"


@pytest.mark.parametrize(("text", "kwargs", "message"), [
    ("localhost", {}, "'localhost' must be HOST:PORT"),
    (":53", {}, "':53' must be HOST:PORT"),
    ("host:", {}, "'host:' must be HOST:PORT"),
    ("host:abc", {}, "'host:abc' must be HOST:PORT: port 'abc' is not a number"),
    ("host:70000", {}, "'host:70000' must be HOST:PORT: port 70000 is out of range 0..65535"),
    ("host:0", {"min_port": 1}, "'host:0' must be HOST:PORT: port 0 is out of range 1..65535"),
])
def test_bad_addresses_are_named(text: str, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        parse_hostport(text, **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message and isinstance(info.value, ValueError)
