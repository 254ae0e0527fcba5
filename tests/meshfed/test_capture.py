"""Traffic capture rules (meshfed.capture), pure: exact rules for given flags, exclusions, IPv6, the plans that
take a nat table to the wanted state; and the command's refusals, with the iptables edge replaced so nothing is
ever applied here (the real thing runs in tests/meshfed/test_capture_netns.py, inside namespaces it creates)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import NoReturn

import pytest
from click.testing import CliRunner

from meshfed import netfilter
from meshfed.capture import (
    CaptureConfig,
    CaptureError,
    Family,
    PortRange,
    has_global_ipv6,
    installed,
    parse_cidrs,
    parse_ports,
    parse_save,
    plan_apply,
    plan_cleanup,
    restore_text,
    rules_for,
)
from meshfed.cli import cli

DEFAULT_V4 = [
    "-A PREROUTING -p tcp -j MESHFED_INBOUND",
    "-A OUTPUT -p tcp -j MESHFED_OUTPUT",
    "-A MESHFED_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j MESHFED_INBOUND",
    "-A MESHFED_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A MESHFED_OUTPUT -o lo -j RETURN",
    "-A MESHFED_OUTPUT -j MESHFED_REDIRECT",
    "-A MESHFED_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    "-A MESHFED_INBOUND -p tcp -m tcp --dport 15000:15090 -j RETURN",
    "-A MESHFED_INBOUND -p tcp -j MESHFED_IN_REDIRECT",
    "-A MESHFED_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
]


def test_default_rules_exact() -> None:
    wanted = rules_for(CaptureConfig(), Family.V4)
    assert wanted.lines() == DEFAULT_V4
    assert wanted.chains == ("MESHFED_INBOUND", "MESHFED_IN_REDIRECT", "MESHFED_OUTPUT", "MESHFED_REDIRECT")
    # the same rules for IPv6 when nothing family-specific is asked, but for the loopback address
    assert rules_for(CaptureConfig(), Family.V6).lines() == [
        line.replace("127.0.0.1/32", "::1/128") for line in DEFAULT_V4]


def test_exclusions_and_ports_exact() -> None:
    config = CaptureConfig(
        proxy_uid=2000,
        outbound_port=16001,
        inbound_port=15006,
        exclude_outbound_cidrs=parse_cidrs("10.96.0.0/12, fd00:10::/64,169.254.169.254", flag="x"),
        exclude_outbound_ports=parse_ports("5432,6000-6010", flag="x"),
        exclude_inbound_ports=parse_ports("22,9090:9091", flag="x"),
    )
    v4 = rules_for(config, Family.V4).lines()
    assert v4 == [
        "-A PREROUTING -p tcp -j MESHFED_INBOUND",
        "-A OUTPUT -p tcp -j MESHFED_OUTPUT",
        "-A MESHFED_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 2000 -j MESHFED_INBOUND",
        "-A MESHFED_OUTPUT -m owner --uid-owner 2000 -j RETURN",
        "-A MESHFED_OUTPUT -o lo -j RETURN",
        "-A MESHFED_OUTPUT -d 10.96.0.0/12 -j RETURN",
        "-A MESHFED_OUTPUT -d 169.254.169.254/32 -j RETURN",
        "-A MESHFED_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A MESHFED_OUTPUT -p tcp -m tcp --dport 6000:6010 -j RETURN",
        "-A MESHFED_OUTPUT -j MESHFED_REDIRECT",
        "-A MESHFED_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
        "-A MESHFED_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A MESHFED_INBOUND -p tcp -m tcp --dport 9090:9091 -j RETURN",
        "-A MESHFED_INBOUND -p tcp -m tcp --dport 15000:15090 -j RETURN",
        # the outbound port is outside the proxy range, so it is excluded by itself
        "-A MESHFED_INBOUND -p tcp -m tcp --dport 16001 -j RETURN",
        "-A MESHFED_INBOUND -p tcp -j MESHFED_IN_REDIRECT",
        "-A MESHFED_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    ]
    v6 = rules_for(config, Family.V6).lines()
    assert "-A MESHFED_OUTPUT -d fd00:10::/64 -j RETURN" in v6
    assert not any("10.96.0.0" in line or "169.254" in line for line in v6)
    assert not any("fd00" in line for line in v4)


def test_parse_ports_and_cidrs() -> None:
    assert parse_ports("", flag="--p") == ()
    assert parse_ports("80, 80,22,1000-1002", flag="--p") == (PortRange(22, 22), PortRange(80, 80),
                                                                 PortRange(1000, 1002))
    assert parse_cidrs("fd00::/8,10.0.0.0/8", flag="--c") == (ipaddress.ip_network("10.0.0.0/8"),
                                                             ipaddress.ip_network("fd00::/8"))
    with pytest.raises(CaptureError, match=r"--exclude-outbound-ports: 'http'"):
        parse_ports("80,http", flag="--exclude-outbound-ports")
    with pytest.raises(CaptureError, match=r"--exclude-inbound-ports: '90-80'"):
        parse_ports("90-80", flag="--exclude-inbound-ports")
    with pytest.raises(CaptureError, match=r"--exclude-inbound-ports: '70000'"):
        parse_ports("70000", flag="--exclude-inbound-ports")
    with pytest.raises(CaptureError, match=r"did you mean 10\.0\.0\.0/8"):
        parse_cidrs("10.1.2.3/8", flag="--exclude-outbound-cidrs")
    with pytest.raises(CaptureError, match="--exclude-outbound-cidrs: 'nope'"):
        parse_cidrs("nope", flag="--exclude-outbound-cidrs")


def test_config_refuses_unusable_values() -> None:
    with pytest.raises(CaptureError, match="--proxy-uid 0"):
        CaptureConfig(proxy_uid=0)
    with pytest.raises(CaptureError, match="must differ"):
        CaptureConfig(outbound_port=15001, inbound_port=15001)
    with pytest.raises(CaptureError, match="--inbound-port 0"):
        CaptureConfig(inbound_port=0)


def save_text(*lines: str, extra_chains: tuple[str, ...] = ()) -> str:
    """What iptables-save -t nat prints for a table holding ``lines``."""
    chains = sorted({line.split()[1] for line in lines} - {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"})
    head = [":PREROUTING ACCEPT [3:180]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [7:420]",
            ":POSTROUTING ACCEPT [7:420]", *(f":{c} - [0:0]" for c in (*chains, *extra_chains))]
    return "\n".join(["# Generated by iptables-save", "*filter", ":INPUT ACCEPT [0:0]", "-A INPUT -j DROP",
                      "COMMIT", "*nat", *head, *lines, "COMMIT", "# Completed", ""])


FOREIGN = "-A OUTPUT -d 192.0.2.1/32 -j RETURN"


def test_plan_apply_is_none_when_in_place() -> None:
    wanted = rules_for(CaptureConfig(), Family.V4)
    table = parse_save(save_text(FOREIGN, *wanted.lines()))
    assert installed(table, Family.V4).key() == wanted.key()
    assert plan_apply(table, wanted) is None
    # the filter table's rules are not the nat table's
    assert all(r.chain != "INPUT" for r in table.rules)


def test_plan_apply_from_empty_and_from_stale() -> None:
    wanted = rules_for(CaptureConfig(), Family.V4)
    fresh = plan_apply(parse_save(save_text(FOREIGN)), wanted)
    assert fresh is not None
    lines = fresh.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert lines[1:5] == [f":{c} - [0:0]" for c in wanted.chains]
    assert lines[5:-1] == DEFAULT_V4
    assert FOREIGN not in fresh and "-D" not in fresh and "-F" not in fresh

    # yesterday's rules (another outbound port, a chain meshfed no longer uses): replaced in one transaction
    stale = [line.replace("15001", "15999") for line in DEFAULT_V4] + ["-A MESHFED_OLD -j RETURN"]
    changed = plan_apply(parse_save(save_text(FOREIGN, *stale)), wanted)
    assert changed is not None
    body = changed.splitlines()[1:-1]
    assert body[:2] == ["-D PREROUTING -p tcp -j MESHFED_INBOUND", "-D OUTPUT -p tcp -j MESHFED_OUTPUT"]
    assert "-F MESHFED_OLD" in body and "-X MESHFED_OLD" in body
    assert "-X MESHFED_OUTPUT" not in body  # kept (emptied and refilled), never re-declared
    assert body[-len(DEFAULT_V4):] == DEFAULT_V4
    assert FOREIGN not in changed


def test_plan_cleanup_touches_only_meshfed() -> None:
    wanted = rules_for(CaptureConfig(), Family.V4)
    assert plan_cleanup(parse_save(save_text(FOREIGN)), Family.V4) is None
    text = plan_cleanup(parse_save(save_text(FOREIGN, *wanted.lines(), extra_chains=("OTHER",))), Family.V4)
    assert text is not None
    assert text.splitlines() == [
        "*nat",
        "-D PREROUTING -p tcp -j MESHFED_INBOUND",
        "-D OUTPUT -p tcp -j MESHFED_OUTPUT",
        *(f"-F {c}" for c in wanted.chains),
        *(f"-X {c}" for c in wanted.chains),
        "COMMIT",
    ]


def test_has_global_ipv6() -> None:
    lo = "00000000000000000000000000000001 01 80 10 80       lo"
    link = "fe800000000000000000000000000001 02 40 20 80   cap0a"
    ula = "fdca00fe000000000000000000000001 02 40 00 80   cap0a"
    assert not has_global_ipv6(lo + "\n" + link + "\n")
    assert has_global_ipv6("\n".join([lo, link, ula]))
    assert not has_global_ipv6("")


def _no_iptables(*args: object, **kwargs: object) -> NoReturn:
    raise AssertionError("the command must not touch iptables here")


@pytest.fixture
def no_iptables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netfilter, "restore", _no_iptables)
    monkeypatch.setattr(netfilter, "read_nat", _no_iptables)


def test_cli_dry_run_prints_rules_and_touches_nothing(no_iptables: None) -> None:
    res = CliRunner().invoke(cli, ["proxy", "capture", "--dry-run", "--exclude-outbound-ports", "5432",
                                   "--exclude-outbound-cidrs", "10.96.0.0/12", "--exclude-outbound-cidrs", "fd00::/8"])
    assert res.exit_code == 0, res.output
    assert "-A MESHFED_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in res.output
    assert "-A MESHFED_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN" in res.output
    assert "-A MESHFED_OUTPUT -d 10.96.0.0/12 -j RETURN" in res.output
    assert "-A MESHFED_OUTPUT -d fd00::/8 -j RETURN" in res.output
    assert res.output.count("*nat") == 2  # both families, each one iptables-restore transaction


def test_cli_bad_flag_names_it(no_iptables: None) -> None:
    res = CliRunner().invoke(cli, ["proxy", "capture", "--dry-run", "--exclude-inbound-ports", "22,ssh"])
    assert res.exit_code == 2
    assert "--exclude-inbound-ports: 'ssh'" in res.output


def test_refuses_the_root_namespace(no_iptables: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard, with /proc faked: same namespace as pid 1 -> refused; pid 1's namespace unreadable and
    no kernel thread to compare with -> refused too; another namespace -> allowed."""
    inodes: dict[int | str, int | None] = {"self": 7, 1: 7, 2: None}
    monkeypatch.setattr(netfilter, "netns_inode", lambda pid: inodes[pid])
    monkeypatch.setattr(netfilter, "_is_kthreadd", lambda pid: False)
    res = CliRunner().invoke(cli, ["proxy", "capture"])
    assert res.exit_code == 1
    assert "refusing to change the root network namespace's iptables rules" in res.output
    res = CliRunner().invoke(cli, ["proxy", "capture", "--cleanup"])
    assert res.exit_code == 1 and "refusing" in res.output
    inodes[1] = None
    with pytest.raises(netfilter.RootNamespaceError, match="cannot tell"):
        netfilter.ensure_pod_namespace()
    inodes[1] = 8
    netfilter.ensure_pod_namespace()


def test_refuses_this_machines_root_namespace() -> None:
    """Not faked: the test process runs in the machine's root namespace, and the guard must see that."""
    own = netfilter.netns_inode("self")
    roots = {netfilter.netns_inode(1), netfilter.netns_inode(2)} - {None}
    if own not in roots:
        pytest.skip("the tests run inside a network namespace of their own here")
    with pytest.raises(netfilter.RootNamespaceError, match="refusing"):
        netfilter.ensure_pod_namespace()


def test_docs_show_the_generated_rules() -> None:
    """docs/traffic-capture.md's chain listing is what --dry-run prints for the defaults, line for line."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "traffic-capture.md").read_text()
    block = doc.split("```text\n*nat\n", 1)[1].split("```", 1)[0]
    wanted = rules_for(CaptureConfig(), Family.V4)
    assert "*nat\n" + block == restore_text([*(f":{c} - [0:0]" for c in wanted.chains), *wanted.lines()])
