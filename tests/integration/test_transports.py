"""Every transport carries HTTP through the VIP, IPv4 and IPv6 inside; MTU handled with ICMP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from caplance.lab import Lab
from caplance.lab.netns import VIP4, VIP6
from tests.integration.services import (
    balancer_config,
    expected_backend,
    fetch,
    start_backend,
    start_balancer,
)

BACKENDS = ("be1", "be2", "be3")


def kernel_gre(lab: Lab) -> tuple[bool, str]:
    done = lab.run("lb", sys.executable, "-c", "import json; from caplance.transports.gre import "
                   "kernel_gre_available as k; print(json.dumps(k()))")
    ok, why = json.loads(done.stdout)
    return bool(ok), str(why)


@pytest.mark.parametrize("transport", ["udp", "gue", "gre-raw", "gre"])
def test_transport_carries_http_ipv4_and_ipv6(lab: Lab, transport: str) -> None:
    if transport == "gre":
        available, why = kernel_gre(lab)
        if not available:
            pytest.skip(f"kernel GRE: {why}")
    for name in BACKENDS:
        start_backend(lab, name, vips=(VIP4, VIP6), transport={"name": transport})
    start_balancer(lab, balancer_config(lab, vips=(VIP4, VIP6), transports=dict.fromkeys(BACKENDS, transport)))
    for vip in (VIP4, VIP6):
        result = fetch(lab, 45, host=str(vip))
        assert result["failures"] == [], (transport, vip)
        assert set(result["served"]) == set(BACKENDS)
        for attempt in result["attempts"]:
            assert attempt["served_by"] == expected_backend(lab, BACKENDS, attempt["source_port"], vip=vip)


def test_kernel_gre_fails_clearly_without_ip_gre(lab: Lab) -> None:
    available, _ = kernel_gre(lab)
    if available:
        pytest.skip("this kernel has ip_gre: the error path cannot be shown here")
    config = balancer_config(lab, backends=("be1",), transports={"be1": "gre"})
    path = lab.write_config("balancer", config)
    done = lab.run("lb", sys.executable, "-m", "caplance.cli", "balancer", "--config", path, check=False)
    assert done.returncode == 1
    assert "cannot create GRE link" in done.stderr and "ip_gre" in done.stderr and "gre-raw" in done.stderr
    assert "Traceback" not in done.stderr


def test_transports_are_chosen_per_backend(lab: Lab) -> None:
    chosen = {"be1": "udp", "be2": "gue", "be3": "gre-raw"}
    for name, transport in chosen.items():
        start_backend(lab, name, transport={"name": transport})
    start_balancer(lab, balancer_config(lab, transports=chosen))
    result = fetch(lab, 60)
    assert result["failures"] == []
    assert set(result["served"]) == set(BACKENDS)


@pytest.fixture
def tight_lab() -> Iterator[Lab]:
    """Balancer-backend links with no room for encapsulation: MTU 1500 everywhere."""
    with Lab(backends=3, backend_mtu=1500) as made:
        yield made


def test_a_packet_over_the_mtu_gets_icmp_back_and_pmtu_discovery_works(tight_lab: Lab) -> None:
    lab = tight_lab
    for name in BACKENDS:
        start_backend(lab, name)
    balancer = start_balancer(lab, balancer_config(lab))
    # A full-sized TCP segment (1500 bytes, DF) + 28 bytes of UDP does not fit a 1500 link:
    # the balancer answers "fragmentation needed", the client lowers its path MTU, resends.
    result = fetch(lab, 6, body=20000, timeout=10)
    assert result["failures"] == []
    route = lab.run("client", "ip", "route", "get", str(VIP4)).stdout
    assert "mtu 1472" in route, route  # the kernel's PMTU cache took our ICMP
    stats = lab.stop(balancer)
    assert stats["icmp_too_big"] >= 1
    assert stats["dropped"]["too_big"] >= 1


def start_udp_vip(lab: Lab) -> subprocess.Popen[bytes]:
    """be1 behind a UDP VIP on port 9999; returns the balancer."""
    start_backend(lab, "be1")
    config = balancer_config(lab, backends=("be1",))
    config["vips"][0].update({"protocol": "udp", "ports": [9999]})
    return start_balancer(lab, config)


def test_oversized_packets_without_df_are_sent_fragmented(tight_lab: Lab) -> None:
    lab = tight_lab
    balancer = start_udp_vip(lab)
    sender = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        "s.setsockopt(socket.IPPROTO_IP, 10, 0);"  # IP_MTU_DISCOVER = DONT: no DF
        f"s.sendto(b'x' * 1472, ('{VIP4}', 9999))"
    )
    lab.run("client", sys.executable, "-c", sender)
    stats = lab.stop(balancer)
    assert stats["outer_fragmented"] == 1
    assert stats["forwarded"] == {"be1": 1}
    assert "too_big" not in stats["dropped"]


def test_icmp_answers_are_rate_limited(tight_lab: Lab) -> None:
    lab = tight_lab
    balancer = start_udp_vip(lab)
    flood = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        "s.setsockopt(socket.IPPROTO_IP, 10, 3);"  # IP_MTU_DISCOVER = PROBE: DF, ignore PMTU
        f"[s.sendto(b'x' * 1472, ('{VIP4}', 9999)) for _ in range(300)]"
    )
    lab.run("client", sys.executable, "-c", flood)
    stats = lab.stop(balancer)
    assert stats["dropped"]["too_big"] == 300
    assert 1 <= stats["icmp_too_big"] <= 100  # a burst of 50, then 50 per second
    assert stats["dropped"]["icmp_rate_limited"] >= 150


def test_nothing_is_left_after_a_kernel_gre_balancer_stops(lab: Lab) -> None:
    available, why = kernel_gre(lab)
    if not available:
        pytest.skip(f"kernel GRE: {why}")
    before = lab.listing("lb")
    start_backend(lab, "be1", transport={"name": "gre"})
    balancer = start_balancer(lab, balancer_config(lab, backends=("be1",), transports={"be1": "gre"}))
    assert fetch(lab, 10)["failures"] == []
    lab.stop(balancer)
    assert lab.listing("lb") == before

