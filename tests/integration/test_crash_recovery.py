"""A balancer and an agent killed with SIGKILL leave their changes behind; the next start in
the same namespace undoes them from the journal (:mod:`caplance.journal`) and says so, and its
clean stop then leaves the hosts exactly as they were before the first start."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from caplance import journal
from caplance.lab import Lab
from tests.integration.services import balancer_config, start_backend_agent, start_balancer

pytestmark = pytest.mark.usefixtures("both_planes")  # the Python plane, and the kernel's tc fast path
ROLES = ("lb", "be1")


@pytest.fixture
def small_lab() -> Iterator[Lab]:
    """A client, a balancer and one backend; removed even if the test fails."""
    with Lab(backends=1) as made:
        yield made


def start_both(lab: Lab, listener: str) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    balancer = start_balancer(lab, balancer_config(lab, listener=listener, backends=("be1",)))
    return balancer, start_backend_agent(lab, "be1")


def kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.communicate(timeout=10)


def stop_cleanly(process: subprocess.Popen[bytes]) -> str:
    """SIGINT (Ctrl-C), wait; its stderr."""
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err.decode()[-2000:]
    return err.decode()


def journals_of(lab: Lab, role: str) -> list[str]:
    inode = os.stat(f"/run/netns/{lab.hosts[role].netns}").st_ino
    directory = journal.directory()
    return sorted(p.name for p in directory.glob(f"{inode}-*")) if directory.exists() else []


def sysctl(lab: Lab, role: str, name: str) -> str:
    return lab.run(role, "sysctl", "-n", name).stdout.strip()


# tun: a TUN device, routes into it and ip_forward; packet: a blackhole route, and with the
# kernel plane an XDP program (tc would come after AF_PACKET's tap) and eth0's forwarding
@pytest.mark.parametrize("listener", ["tun", "packet"])
def test_a_killed_run_is_undone_by_the_next_and_a_clean_stop_leaves_nothing(
        small_lab: Lab, both_planes: str, listener: str) -> None:
    lab = small_lab
    before = {role: lab.listing(role) for role in ROLES}
    assert sysctl(lab, "lb", "net.ipv4.ip_forward") == "0"
    for process in start_both(lab, listener):
        kill(process)
    left = {role: lab.listing(role) for role in ROLES}
    for role in ROLES:  # the kill left changes behind, and the journals that name them
        assert left[role] != before[role], role
        assert journals_of(lab, role), role
    if listener == "tun":
        assert sysctl(lab, "lb", "net.ipv4.ip_forward") == "1"  # the bug this journal fixes
    else:
        assert "blackhole 10.99.0.1" in lab.run("lb", "ip", "route", "show", "table", "all").stdout
    assert "10.99.0.1/32" in lab.run("be1", "ip", "-o", "addr", "show", "dev", "lo").stdout
    if both_planes == "kernel":  # the programs stay attached without their process
        assert "bpf" in lab.run("be1", "tc", "filter", "show", "dev", "eth0", "ingress").stdout
        if listener == "tun":
            assert "bpf" in lab.run("lb", "tc", "filter", "show", "dev", "eth0", "ingress").stdout
        else:
            assert "xdp" in lab.run("lb", "ip", "link", "show", "dev", "eth0").stdout
            assert sysctl(lab, "lb", "net.ipv4.conf.eth0.forwarding") == "1"
    if both_planes == "kernel" and listener == "packet":
        lab.run_switch("ip", "link", "set", "dev", "lb", "xdpdrv", "off")  # start_balancer attaches it again
    balancer, agent = start_both(lab, listener)
    logs = [stop_cleanly(agent), stop_cleanly(balancer)]
    for err in logs:
        assert "left by a run that died" in err, err[-2000:]
    for role in ROLES:
        assert lab.listing(role) == before[role], role
        assert journals_of(lab, role) == [], role
