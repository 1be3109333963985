"""Worker processes in namespaces: two Python data planes fed by the kernel's fan-out, one
control plane; every flow gets the backend Maglev picks whichever worker handles it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from caplance.lab import Lab
from tests.integration.services import (
    balancer_config,
    ctl,
    expected_backend,
    fetch,
    start_backend,
    start_balancer,
    wait_for,
)

BACKENDS = ("be1", "be2", "be3")


def start_two_workers(lab: Lab, listener: str) -> None:
    for name in BACKENDS:
        start_backend(lab, name)
    start_balancer(lab, balancer_config(lab, listener=listener, workers=2))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("listener", ["tun", "raw", "packet", "nfqueue"])
def test_two_workers_share_the_flows_and_agree_on_every_backend(lab: Lab, listener: str) -> None:
    start_two_workers(lab, listener)
    sources = []
    if listener == "nfqueue":  # its kernel hash spreads by address: give the client more of them
        sources = [f"10.77.0.{n}" for n in range(20, 40)]
        for source in sources:
            lab.run("client", "ip", "addr", "add", f"{source}/24", "dev", "eth0")
    result = fetch(lab, 200, sources=sources)
    assert result["failures"] == []
    for attempt in result["attempts"]:
        assert attempt["served_by"] == expected_backend(lab, BACKENDS, attempt["source_port"],
                                                        client=attempt.get("source"))
    dataplane = ctl(lab, "status")["dataplane"]
    assert dataplane["workers"] == 2 and dataplane["workers_up"] == 2
    assert all(count > 0 for count in dataplane["worker_packets_in"]), dataplane  # both carried flows


def test_a_dead_worker_is_restarted_and_counted(lab: Lab) -> None:
    start_two_workers(lab, "tun")
    assert fetch(lab, 30)["failures"] == []
    first = ctl(lab, "status")["dataplane"]
    victim = first["worker_pids"][0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: ctl(lab, "status")["dataplane"]["worker_restarts"] == 1, what="a restart counted")
    wait_for(lambda: ctl(lab, "status")["dataplane"]["workers_up"] == 2, what="both workers up again")
    after = ctl(lab, "status")["dataplane"]
    assert after["worker_pids"][0] != victim and after["worker_pids"][1] == first["worker_pids"][1]
    result = fetch(lab, 60)
    assert result["failures"] == [] and set(result["served"]) == set(BACKENDS)
    assert ctl(lab, "status")["counters"]["packets_in"] >= first["worker_packets_in"][0]  # totals kept


def test_workers_end_with_a_balancer_that_is_killed(lab: Lab) -> None:
    for name in BACKENDS:
        start_backend(lab, name)
    balancer = start_balancer(lab, balancer_config(lab, workers=2))
    pids = ctl(lab, "status")["dataplane"]["worker_pids"]
    assert all(alive(pid) for pid in pids)
    balancer.kill()
    balancer.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)  # no orphan forwarding for a dead control plane
