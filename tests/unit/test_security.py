"""The control channel's fail-fast checks, on config values (pure: no network)."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from caplance.config import AgentConfig, BalancerConfig, Secret, VipConfig
from caplance.errors import ConfigError
from caplance.security import MIN_SECRET_BYTES, control_security, require_control_security

VIPS = (VipConfig(address=ipaddress.ip_address("10.99.0.1")),)
GOOD = Secret(b"x" * MIN_SECRET_BYTES)


def paths(config: BalancerConfig | AgentConfig) -> list[str]:
    return [path for path, _ in control_security(config)]


def test_a_balancer_without_a_control_channel_needs_nothing() -> None:
    assert paths(BalancerConfig(vips=VIPS)) == []


@pytest.mark.parametrize(("control", "secret", "networks", "expected"), [
    ("10.77.0.1:7000", GOOD, ("10.77.0.0/24",), []),
    ("127.0.0.1:7000", GOOD, (), []),  # loopback: only this host can reach it
    ("[::1]:7000", GOOD, (), []),
    ("10.77.0.1:7000", None, ("10.77.0.0/24",), ["$.secret_file"]),
    ("10.77.0.1:7000", Secret(b"x" * (MIN_SECRET_BYTES - 1)), ("10.77.0.0/24",), ["$.secret_file"]),
    ("10.77.0.1:7000", GOOD, (), ["$.allowed_networks"]),
    ("0.0.0.0:7000", None, (), ["$.secret_file", "$.allowed_networks"]),
])
def test_a_balancer_needs_a_long_secret_and_networks_off_loopback(
        control: str, secret: Secret | None, networks: tuple[str, ...], expected: list[str]) -> None:
    config = BalancerConfig(vips=VIPS, control=control, secret=secret, allowed_networks=networks)
    assert paths(config) == expected


def test_an_agent_needs_a_secret_only_when_it_registers() -> None:
    assert paths(AgentConfig(name="be1", vips=("10.99.0.1",))) == []
    assert paths(AgentConfig(name="be1", vips=("10.99.0.1",), balancer="10.77.0.1:7000")) == ["$.secret_file"]
    assert paths(AgentConfig(name="be1", vips=("10.99.0.1",), balancer="10.77.0.1:7000", secret=GOOD)) == []


def test_unsafe_is_an_error_unless_insecure_control_says_so(caplog: pytest.LogCaptureFixture) -> None:
    unsafe = BalancerConfig(vips=VIPS, control="10.77.0.1:7000")
    with pytest.raises(ConfigError) as raised:
        require_control_security(unsafe)
    assert [path for path, _ in raised.value.problems] == ["$.secret_file", "$.allowed_networks"]
    assert all("insecure_control = true" in message for _, message in raised.value.problems)
    with caplog.at_level(logging.WARNING, logger="caplance.security"):
        require_control_security(BalancerConfig(vips=VIPS, control="10.77.0.1:7000", insecure_control=True))
    assert [record.getMessage() for record in caplog.records] == ["insecure control channel (insecure_control = true)"]
