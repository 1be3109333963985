"""Scale-out in namespaces: a BIRD router spreads the VIP over two balancers by ECMP, each
balancer announcing it by BGP -- through ExaBGP or through a BIRD of its own (every test runs
with both announcers) -- while it can serve it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from caplance.lab import Lab, routing
from caplance.lab.netns import LAB_NETWORK4, VIP4
from tests.integration.services import CAPLANCE, LAB, balancer_config, fetch, secret_env

BACKENDS = ("be1", "be2", "be3")


class ScaleOut:
    """The routed lab with two balancers announcing the VIP and three agents on both."""

    def __init__(self, lab: Lab, kind: str) -> None:
        self.lab = lab
        self.kind = kind
        self.router_socket = routing.start_router(lab, bfd=kind == "bird")
        self.balancers: dict[str, subprocess.Popen[bytes]] = {}
        self.speakers: dict[str, str] = {}
        for host in lab.balancers:
            if kind == "bird":
                self.speakers[host.role] = routing.start_balancer_bird(lab, host.role)
            self.start_balancer(host.role)
        for name in BACKENDS:
            lab.start(name, *LAB, "echo", "--name", name)
            lab.start(name, *LAB, "http", "--name", name)
            config = {"name": name, "vips": [str(VIP4)], "balancer": f"{lab.hosts['lb'].ipv4}:7000",
                      "register_with": [f"{lab.hosts['lb2'].ipv4}:7000"], "heartbeat_interval": 0.3,
                      "drain_timeout": 1.0}
            lab.start(name, *CAPLANCE, "agent", "--config", lab.write_config(name, config), env=secret_env())
        self.wait(lambda: all(self.active(role) == set(BACKENDS) for role in self.balancers),
                  "every backend active on both balancers (the same backend set: the same choices)")
        self.wait(lambda: self.nexthops() == {str(h.ipv4) for h in lab.balancers}, "both balancers announcing")

    def active(self, role: str) -> set[str]:
        return {row["backend"] for row in self.ctl(role, "status")["backends"] if row["state"] == "active"}

    def start_balancer(self, role: str) -> None:
        host = self.lab.hosts[role]
        config = balancer_config(self.lab, backends=())
        config["vips"][0]["ports"] = [80, 8080]
        config.update({"control": f"{host.ipv4}:7000", "allowed_networks": [str(LAB_NETWORK4)],
                       "heartbeat_timeout": 2.0,
                       "control_socket": str(self.lab.workdir / f"{role}.sock"),
                       "announce": routing.announce_options(self.lab, role, self.kind,
                                                            socket=self.speakers.get(role))})
        self.balancers[role] = self.lab.start(role, *CAPLANCE, "balancer", "--print-stats", "--config",
                                              self.lab.write_config(role, config), env=secret_env())

    def nexthops(self) -> set[str]:
        return routing.router_nexthops(self.lab)

    def ctl(self, role: str, *args: str) -> Any:
        done = self.lab.run(role, *CAPLANCE, "ctl", "--socket", str(self.lab.workdir / f"{role}.sock"), "--json",
                            *args)
        return json.loads(done.stdout)

    @staticmethod
    def wait(predicate: Any, what: str, timeout: float = 30) -> float:
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)
        return time.monotonic() - start

    def streams(self, count: int, seconds: float) -> subprocess.Popen[bytes]:
        return self.lab.spawn("client", *LAB, "streams", "--host", str(VIP4), "--count", str(count),
                              "--seconds", str(seconds), "--interval", "0.1",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    @staticmethod
    def result(client: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
        out, err = client.communicate(timeout=90)
        assert client.returncode == 0, err.decode()[-2000:]
        return json.loads(out.decode().splitlines()[-1])  # type: ignore[no-any-return]

    def speaker_pid(self, role: str) -> int:
        """The BGP speaker of balancer ``role``: its ExaBGP, or its BIRD."""
        wanted = "exabgp" if self.kind == "exabgp" else "bird"
        for pid in self.lab.run(role, "ip", "netns", "pids", self.lab.hosts[role].netns, check=False).stdout.split():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(os.path.basename(part.decode()) == wanted for part in command[:2]):
                return int(pid)
        raise AssertionError(f"no {wanted} in {role}")


@pytest.fixture(params=["exabgp", "bird"])
def scale_out(request: pytest.FixtureRequest) -> Iterator[ScaleOut]:
    with Lab(backends=3, balancers=2, router=True) as lab:
        yield ScaleOut(lab, request.param)


def test_both_balancers_carry_a_share_of_the_flows(scale_out: ScaleOut) -> None:
    result = fetch(scale_out.lab, 200, timeout=3)
    assert result["failures"] == [] and set(result["served"]) == set(BACKENDS)
    seen = {role: scale_out.ctl(role, "status")["counters"]["packets_in"] for role in ("lb", "lb2")}
    total = sum(seen.values())
    assert all(count > total * 0.2 for count in seen.values()), seen  # ECMP spreads the flows
    for role in ("lb", "lb2"):
        assert scale_out.ctl(role, "status")["announcements"]["vips"][str(VIP4)]["announced"] is True


def test_a_graceful_stop_withdraws_first_and_breaks_no_flow(scale_out: ScaleOut) -> None:
    client = scale_out.streams(40, 10)
    time.sleep(2.5)
    leaving = scale_out.balancers["lb"]
    scale_out.ctl("lb", "drain-balancer")
    scale_out.wait(lambda: scale_out.nexthops() == {str(scale_out.lab.hosts["lb2"].ipv4)}, "lb withdrawn", 10)
    assert leaving.poll() is None  # withdrawn while it still forwards (its grace, then its drain)
    stats = scale_out.lab.stop(leaving, timeout=30)
    streams = scale_out.result(client)
    assert len(streams) == 40
    broken = [s for s in streams if s["error"] is not None]
    assert broken == [], broken[:3]  # every packet moved to lb2, which picked the same backend
    assert stats["packets_in"] > 0


@pytest.mark.parametrize("victim", ["balancer", "speaker"])
def test_a_hard_failure_takes_the_route_away_within_the_hold_time(scale_out: ScaleOut, victim: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    client = scale_out.streams(30, 10)
    time.sleep(2.5)
    pid = scale_out.balancers["lb"].pid if victim == "balancer" else scale_out.speaker_pid("lb")
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    outage = scale_out.wait(lambda: str(scale_out.lab.hosts["lb"].ipv4) not in scale_out.nexthops(),
                            "lb's route gone", 10)
    assert outage < 3.5  # the hold time (3 s), and with BFD far less
    streams = scale_out.result(client)
    broken = [s for s in streams if s["error"] is not None]
    with capsys.disabled():
        print(f"\n[{scale_out.kind}, {victim} killed] route gone after {outage:.2f} s;"
              f" broken long-lived flows: {len(broken)} of {len(streams)} {[(b['served_by'], b['chunks']) for b in broken]}")
    assert time.monotonic() - started < 60
    assert len(broken) <= len(streams) // 2  # only some of lb's could break, in the outage


def test_a_vip_without_active_backends_is_withdrawn_and_comes_back(scale_out: ScaleOut) -> None:
    for name in BACKENDS:
        scale_out.ctl("lb", "pause", name)  # on lb only: lb2 still has them all
    scale_out.wait(lambda: scale_out.nexthops() == {str(scale_out.lab.hosts["lb2"].ipv4)}, "lb withdrawn", 10)
    state = scale_out.ctl("lb", "status")["announcements"]["vips"][str(VIP4)]
    assert state["announced"] is False and "fewer than 1" in state["reason"]
    assert fetch(scale_out.lab, 40, timeout=3)["failures"] == []  # lb2 serves it all
    scale_out.ctl("lb", "resume", "be2")
    scale_out.wait(lambda: len(scale_out.nexthops()) == 2, "lb announcing again", 10)
