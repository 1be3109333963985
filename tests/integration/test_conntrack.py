"""Connection tracking in namespaces: established connections survive every change of the
backend set, and two balancers with cold tables agree on every flow."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from caplance.lab import Lab
from caplance.lab.netns import VIP4
from tests.integration import services
from tests.integration.services import (
    CAPLANCE,
    LAB,
    balancer_config,
    ctl,
    start_agent,
    start_dynamic_balancer,
    states,
    wait_for,
)


pytestmark = pytest.mark.usefixtures("both_planes")  # every test with the Python and the kernel data plane


@pytest.fixture
def lab4() -> Iterator[Lab]:
    with Lab(backends=4) as made:
        yield made


def start_echo_agent(lab: Lab, name: str) -> subprocess.Popen[bytes]:
    lab.start(name, *LAB, "echo", "--name", name)
    return start_agent(lab, name, drain_timeout=60.0)


def active(lab: Lab, *names: str) -> bool:
    now = states(lab)
    return all(now.get(name) == "active" for name in names)


@pytest.mark.parametrize("workers", [1, 2])
def test_long_lived_connections_survive_every_change_of_the_backend_set(lab4: Lab, workers: int) -> None:
    lab = lab4
    start_dynamic_balancer(lab, vips=[{"address": str(VIP4), "protocol": "tcp", "ports": [8080]}],
                           workers=workers)
    agents = {name: start_echo_agent(lab, name) for name in ("be1", "be2", "be3")}
    wait_for(lambda: active(lab, "be1", "be2", "be3"), what="three backends active")
    client = lab.spawn("client", *LAB, "streams", "--host", str(VIP4), "--count", "50", "--seconds", "12",
                       "--interval", "0.1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2)
    agents["be4"] = start_echo_agent(lab, "be4")  # a backend is added
    wait_for(lambda: active(lab, "be4"), what="be4 active")
    time.sleep(1)
    ctl(lab, "pause", "be1")  # another is paused
    time.sleep(1)
    ctl(lab, "drain", "be2", "--timeout", "60")  # one is drained
    time.sleep(1)
    ctl(lab, "resume", "be1")
    time.sleep(1)
    agents["be3"].send_signal(signal.SIGKILL)  # the only connections that may break
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err.decode()[-2000:]
    streams = json.loads(out.decode().splitlines()[-1])
    assert len(streams) == 50
    assert all(stream["served_by"] for stream in streams), streams[:3]
    by_backend = {s["served_by"] for s in streams}
    assert {"be1", "be2"} <= by_backend  # the paused and the drained one had connections
    for stream in streams:
        if stream["served_by"] != "be3":
            assert stream["error"] is None, stream
            assert stream["chunks"] >= 80  # ~12 s at one chunk per 100 ms, every one intact
    status = ctl(lab, "status")
    if services.plane == "python":
        assert status["conntrack"]["hits"] > 0
    else:  # the kernel's flow table kept them (the Python plane saw next to nothing)
        assert status["fastpath"]["mode"] == "tc" and status["fastpath"]["seen"] > 1000
        assert status["fastpath"]["flows_rehashed"] > 0  # be3's flows, re-hashed once it was killed
    assert status["dataplane"].get("workers", 1) == workers
    assert states(lab)["be2"] == "draining" and states(lab)["be3"] == "gone"


def test_two_balancers_with_cold_tables_agree_on_every_flow() -> None:
    with Lab(backends=3, balancers=2) as lab:
        config = balancer_config(lab, backends=("be1", "be2", "be3"))
        config["vips"][0].update({"protocol": "udp", "ports": [9999]})
        for name in ("be1", "be2", "be3"):
            agent = {"name": name, "vips": [str(VIP4)],
                     "balancers": [str(lab.hosts["lb"].ipv4), str(lab.hosts["lb2"].ipv4)]}
            lab.start(name, *CAPLANCE, "agent", "--config", lab.write_config(name, agent))
            lab.start(name, *LAB, "udp-name", "--name", name, "--address", str(VIP4))  # VIP on lo now
        for role in ("lb", "lb2"):
            config["control_socket"] = str(lab.workdir / f"{role}.sock")
            lab.start(role, *CAPLANCE, "balancer", "--config", lab.write_config(role, config))
        answers = {}
        for role in ("lb", "lb2"):
            lab.route_vips_via(role)
            done = lab.run("client", *LAB, "ask-udp", "--host", str(VIP4), "--ports", "20000-20099")
            answers[role] = json.loads(done.stdout)
        assert None not in answers["lb"].values()
        assert set(answers["lb"].values()) == {"be1", "be2", "be3"}
        assert answers["lb"] == answers["lb2"]


def test_a_flow_keeps_its_backend_when_the_fast_path_goes_off_and_on(lab4: Lab, both_planes: str) -> None:
    """Long-lived connections while an operator detaches the kernel program (the Python
    plane takes over) and attaches it again: none breaks, none moves."""
    if both_planes == "python":
        pytest.skip("a switch of the kernel data plane")
    lab = lab4
    start_dynamic_balancer(lab, vips=[{"address": str(VIP4), "protocol": "tcp", "ports": [8080]}])
    for name in ("be1", "be2", "be3"):
        start_echo_agent(lab, name)
    wait_for(lambda: active(lab, "be1", "be2", "be3"), what="three backends active")
    client = lab.spawn("client", *LAB, "streams", "--host", str(VIP4), "--count", "30", "--seconds", "9",
                       "--interval", "0.1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2)
    seen_before = ctl(lab, "status")["fastpath"]["seen"]
    assert "off" in ctl(lab, "fastpath", "off")
    time.sleep(2)
    during = ctl(lab, "status")
    assert during["fastpath"]["attached"] == 0
    python_packets = during["counters"]["packets_in"]
    assert "on" in ctl(lab, "fastpath", "on")
    time.sleep(2)
    after = ctl(lab, "status")
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err.decode()[-2000:]
    streams = json.loads(out.decode().splitlines()[-1])
    assert len(streams) == 30 and all(s["error"] is None and s["chunks"] >= 60 for s in streams), streams[:3]
    assert after["fastpath"]["attached"] == 1 and after["fastpath"]["seen"] > seen_before  # it had them...
    assert python_packets > 50  # ...then the Python plane did, on the same backends...
    assert after["fastpath"]["seen"] - seen_before > 100  # ...then the kernel again
