"""The egress policy's network logic: defaults, mapped addresses, allow and deny lists."""

from __future__ import annotations

import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from botocore.exceptions import HTTPClientError

from storage.base import EgressDenied
from storage.egress import (
    ALLOW_SETTING,
    DEFAULT_DENY,
    DENY_SETTING,
    EgressPolicy,
    EgressResolver,
    denied,
    networks_except,
    normalise,
    parse_networks,
    refusal_in,
)

DEFAULT = EgressPolicy()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.0.0.2",
        "127.255.255.254",
        "::1",
        "169.254.169.254",  # cloud metadata
        "169.254.1.1",
        "fd00:ec2::254",
        "fe80::1",
        "fe80::1%eth0",
        "0.0.0.0",
        "0.1.2.3",
        "::",
        "224.0.0.1",
        "239.255.255.250",
        "ff02::1",
        "255.255.255.255",
        # IPv4-mapped IPv6 forms of the same: the socket reaches the IPv4 address.
        "::ffff:127.0.0.1",
        "::ffff:7f00:1",
        "::ffff:169.254.169.254",
        "::ffff:0.0.0.0",
    ],
)
def test_the_default_list_denies(address: str) -> None:
    assert DEFAULT.refused_by(address) == DENY_SETTING


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "10.1.2.3", "192.168.0.10", "2001:db8::1", "::ffff:8.8.8.8"]
)
def test_the_default_list_allows_other_addresses(address: str) -> None:
    assert DEFAULT.allows(address)


def test_normalise_unwraps_mapped_addresses_and_zones() -> None:
    assert str(normalise("::ffff:127.0.0.1")) == "127.0.0.1"
    assert str(normalise("[::1]")) == "::1"
    assert str(normalise("fe80::1%eth0")) == "fe80::1"


def test_setting_the_deny_list_replaces_the_default() -> None:
    policy = EgressPolicy.from_settings("10.0.0.0/8", None)
    assert policy.refused_by("10.9.9.9") == DENY_SETTING
    assert policy.allows("127.0.0.1")  # no longer in the list
    nothing = EgressPolicy.from_settings("", "")
    assert nothing.allows("127.0.0.1") and nothing.allows("169.254.169.254")
    assert EgressPolicy.from_settings(None, None) == DEFAULT


def test_an_allow_list_admits_only_its_networks_and_the_deny_list_still_wins() -> None:
    policy = EgressPolicy.from_settings(None, "10.0.0.0/8, 127.0.0.0/8")
    assert policy.allows("10.2.3.4")
    assert policy.refused_by("8.8.8.8") == ALLOW_SETTING
    assert policy.refused_by("127.0.0.1") == DENY_SETTING  # allowed by one, denied by the other


def test_mapped_networks_in_the_settings_mean_their_ipv4_networks() -> None:
    policy = EgressPolicy.from_settings("::ffff:10.0.0.0/104", "")
    assert policy.refused_by("10.1.1.1") == DENY_SETTING
    assert policy.refused_by("::ffff:10.1.1.1") == DENY_SETTING


def test_a_bad_network_is_named_with_its_setting() -> None:
    with pytest.raises(ValueError, match="EGRESS_DENY_NETWORKS: 'nonsense'"):
        parse_networks("10.0.0.0/8,nonsense", DENY_SETTING)
    assert parse_networks(" 10.0.0.1 , ,::1", ALLOW_SETTING) == parse_networks(
        "10.0.0.1/32,::1/128", ALLOW_SETTING
    )


def test_the_default_list_except_one_loopback_address() -> None:
    text = ",".join(networks_except(DEFAULT_DENY, "127.0.0.1"))
    policy = EgressPolicy.from_settings(text, "")
    assert policy.allows("127.0.0.1") and policy.allows("::ffff:127.0.0.1")
    for still in ("127.0.0.2", "127.0.0.0", "127.1.0.1", "::1", "169.254.169.254", "0.0.0.0"):
        assert policy.refused_by(still) == DENY_SETTING, still


def test_a_refusal_names_the_host_as_written_and_the_setting() -> None:
    with pytest.raises(EgressDenied) as caught:
        DEFAULT.check("metadata.example", "169.254.169.254")
    err = caught.value
    assert err.code == "egress_denied" and err.host == "metadata.example"
    assert "metadata.example" in err.message and DENY_SETTING in err.message
    assert "169.254" not in err.message  # what the name resolved to is not told
    with pytest.raises(EgressDenied, match=ALLOW_SETTING):
        EgressPolicy.from_settings("", "10.0.0.0/8").check("example.org", "8.8.8.8")


def test_filter_keeps_allowed_addresses_and_refuses_when_none_is() -> None:
    assert DEFAULT.filter("h", ["127.0.0.1", "10.0.0.1"]) == ["10.0.0.1"]
    with pytest.raises(EgressDenied):
        DEFAULT.filter("h", ["127.0.0.1", "::1"])


def test_resolving_localhost_is_refused_by_default() -> None:
    with pytest.raises(EgressDenied, match="localhost"):
        DEFAULT.resolve("localhost", 80)


class _Rebinding(AbstractResolver):
    """A name server that answers what the test says (a rebinding one, say)."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_the_resolver_keeps_allowed_addresses_and_refuses_when_none_is() -> None:
    mixed = EgressResolver(DEFAULT, _Rebinding("169.254.169.254", "10.0.0.7"))
    assert [r["host"] for r in await mixed.resolve("store.example", 443)] == ["10.0.0.7"]
    with pytest.raises(EgressDenied, match=r"store\.example"):
        await EgressResolver(DEFAULT, _Rebinding("127.0.0.1", "::1")).resolve("store.example")


def test_a_refusal_wrapped_by_a_client_is_found() -> None:
    refusal = denied("h", DENY_SETTING)
    assert refusal_in(HTTPClientError(error=refusal)) is refusal
    try:
        try:
            raise refusal
        except EgressDenied as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        assert refusal_in(outer) is refusal
    assert refusal_in(RuntimeError("other")) is None
