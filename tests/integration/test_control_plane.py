"""Backends that register, prove themselves, beat, fail, drain and leave -- with real
processes and real packets in namespaces."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from caplance.lab import Lab
from tests.integration.services import (
    CAPLANCE,
    SECRET,
    control_address,
    ctl,
    expected_backend,
    fetch,
    fetch_in_background,
    fetch_result,
    start_agent,
    start_dynamic_balancer,
    states,
    wait_for,
)

HOSTILE = str(Path(__file__).with_name("hostile_client.py"))
pytestmark = pytest.mark.usefixtures("both_planes")  # every test with the Python and the kernel data plane


def active(lab: Lab, *names: str) -> bool:
    now = states(lab)
    return all(now.get(name) == "active" for name in names)


def test_a_backend_joins_while_traffic_flows(lab: Lab) -> None:
    start_dynamic_balancer(lab)
    start_agent(lab, "be1")
    start_agent(lab, "be2")
    wait_for(lambda: active(lab, "be1", "be2"), what="be1, be2 active")
    client = fetch_in_background(lab, 500)
    time.sleep(1.0)
    start_agent(lab, "be3")
    wait_for(lambda: active(lab, "be3"), what="be3 active")
    result = fetch_result(client)
    assert result["failures"] == []  # connections in flight stay where they are (conntrack)
    assert result["served"].get("be3", 0) > 0  # new connections reach the newcomer
    assert set(result["served"]) == {"be1", "be2", "be3"}


def test_wrong_secret_never_gets_traffic(lab: Lab) -> None:
    start_dynamic_balancer(lab)
    start_agent(lab, "be1")
    intruder = start_agent(lab, "be2", secret="not the secret, though long enough")
    wait_for(lambda: active(lab, "be1"), what="be1 active")
    time.sleep(1.5)  # the intruder keeps retrying meanwhile
    status = ctl(lab, "status")
    assert "be2" not in {row["backend"] for row in status["backends"]}
    # The intruder checks the balancer's proof first, finds it wrong and hangs up; the operator
    # sees from where.
    assert status["control"].get("handshake_abandoned", 0) >= 1
    refused = {(r["address"], r["reason"]): r["count"] for r in status["refusals"]["recent"]}
    assert refused.get((str(lab.hosts["be2"].ipv4), "handshake_abandoned"), 0) >= 1, refused
    assert status["refusals"]["total"]["handshake_abandoned"] >= 1
    result = fetch(lab, 60)
    assert result["failures"] == []
    assert set(result["served"]) == {"be1"}
    assert intruder.poll() is None  # refused, logged, retrying -- not crashed
    intruder.send_signal(signal.SIGTERM)
    _, err = intruder.communicate(timeout=10)
    assert b"failed to prove it knows the secret" in err


def test_an_impostor_under_a_held_name_gets_no_traffic_and_the_real_backend_never_flaps(lab: Lab) -> None:
    """Another host with the shared secret registers as be1: refused while be1 holds its name."""
    start_dynamic_balancer(lab)
    start_agent(lab, "be1")
    wait_for(lambda: active(lab, "be1"), what="be1 active")
    impostor = start_agent(lab, "be1", host="be2")
    be2 = str(lab.hosts["be2"].ipv4)
    wait_for(lambda: any(r["address"] == be2 and r["reason"] == "name_held"
                         for r in ctl(lab, "status")["refusals"]["recent"]), what="the impostor refused")
    result = fetch(lab, 100)
    time.sleep(1.0)  # the impostor keeps retrying meanwhile
    status = ctl(lab, "status")
    assert result["failures"] == []
    assert set(result["served"]) == {"be1"}  # never "be1@be2"
    (row,) = status["backends"]
    assert (row["backend"], row["state"], row["address"], row["registered_from"]) == (
        "be1", "active", str(lab.hosts["be1"].ipv4), str(lab.hosts["be1"].ipv4))
    assert status["control"]["registrations"] == 1  # be1 was never replaced
    assert status["control"]["refused_name_held"] >= 1
    assert impostor.poll() is None  # refused and retrying, not crashed
    impostor.send_signal(signal.SIGTERM)
    _, err = impostor.communicate(timeout=10)
    assert b"is held by an agent at" in err


def test_a_replayed_handshake_is_refused(lab: Lab) -> None:
    start_dynamic_balancer(lab)
    host, port = control_address(lab).split(":")
    done = lab.run("client", sys.executable, HOSTILE, "replay", host, port, SECRET)
    answer = json.loads(done.stdout)
    assert answer["first"] == "welcome"  # the original handshake was good...
    assert answer["replayed"][:1] == ["challenge"]  # ...its replay meets a fresh nonce
    assert "refused" in answer["replayed"]
    assert "authentication failed" in answer["reasons"]
    assert states(lab).get("replayer") in (None, "gone")
    assert ctl(lab, "status")["control"]["refused_auth"] == 1


def test_a_backend_failing_the_data_path_proof_never_gets_traffic(lab: Lab) -> None:
    start_dynamic_balancer(lab)
    start_agent(lab, "be1")
    # be2's control channel works, but nothing reaches its data port.
    lab.run("be2", "nft", "-f", "-", input=(
        "table inet block {\n chain in {\n type filter hook input priority 0;\n"
        " udp dport 7001 drop\n }\n}\n"))
    start_agent(lab, "be2")
    wait_for(lambda: active(lab, "be1"), what="be1 active")
    wait_for(lambda: ctl(lab, "status")["control"].get("refused_proof", 0) >= 1,
             what="a failed proof")
    assert states(lab).get("be2") in ("registering", "gone")  # it keeps trying, never active
    result = fetch(lab, 60)
    assert result["failures"] == []
    assert set(result["served"]) == {"be1"}


def test_a_killed_agent_is_removed_and_healthy_backends_never_fail(lab: Lab) -> None:
    start_dynamic_balancer(lab, heartbeat_timeout=2.0)
    agents = {name: start_agent(lab, name) for name in ("be1", "be2", "be3")}
    wait_for(lambda: active(lab, "be1", "be2", "be3"), what="all active")
    client = fetch_in_background(lab, 500)
    time.sleep(1.0)
    agents["be2"].send_signal(signal.SIGKILL)
    # (its connection closes with it, so this is at once; a frozen agent is the test below)
    wait_for(lambda: states(lab).get("be2") == "gone", timeout=2.0, what="be2 removed within the timeout")
    result = fetch_result(client)
    for attempt in result["attempts"]:
        if attempt["served_by"] is None:  # only flows that were be2's may fail
            assert expected_backend(lab, ("be1", "be2", "be3"), attempt["source_port"]) == "be2"
    assert result["served"].get("be1", 0) > 0 and result["served"].get("be3", 0) > 0


def test_a_frozen_agent_is_removed_after_the_heartbeat_timeout(lab: Lab) -> None:
    start_dynamic_balancer(lab, heartbeat_timeout=1.5)
    agent = start_agent(lab, "be1")
    start_agent(lab, "be2")
    wait_for(lambda: active(lab, "be1", "be2"), what="both active")
    agent.send_signal(signal.SIGSTOP)  # its connection stays open; its heartbeats stop
    try:
        stopped = time.monotonic()
        wait_for(lambda: states(lab).get("be1") == "gone", timeout=5, what="be1 expired")
        assert time.monotonic() - stopped >= 1.0  # not before the timeout
        result = fetch(lab, 40)
        assert result["failures"] == [] and set(result["served"]) == {"be2"}
    finally:
        agent.send_signal(signal.SIGCONT)
    # lost is not sent away: once it runs again it registers again
    wait_for(lambda: states(lab).get("be1") == "active", timeout=20, what="be1 back")
    assert "be1" in fetch(lab, 40)["served"]


def test_ctl_pause_resume_drain_deregister(lab: Lab) -> None:
    start_dynamic_balancer(lab)
    for name in ("be1", "be2", "be3"):
        start_agent(lab, name)
    wait_for(lambda: active(lab, "be1", "be2", "be3"), what="all active")
    assert set(fetch(lab, 60)["served"]) == {"be1", "be2", "be3"}

    ctl(lab, "pause", "be1")
    assert states(lab)["be1"] == "paused"
    paused = fetch(lab, 60)
    assert paused["failures"] == [] and "be1" not in paused["served"]

    ctl(lab, "resume", "be1")
    wait_for(lambda: "be1" in fetch(lab, 30)["served"], what="be1 serving again")

    ctl(lab, "drain", "be2", "--timeout", "1")
    assert states(lab)["be2"] == "draining"
    draining = fetch(lab, 60)
    assert draining["failures"] == [] and "be2" not in draining["served"]
    wait_for(lambda: states(lab)["be2"] == "gone", timeout=5, what="drain deadline")

    ctl(lab, "deregister", "be3")
    assert states(lab)["be3"] == "gone"
    left = fetch(lab, 60)
    assert left["failures"] == [] and set(left["served"]) == {"be1"}


def test_agent_sigterm_drains_then_deregisters(lab: Lab) -> None:
    start_dynamic_balancer(lab)
    leaving = start_agent(lab, "be1", drain_timeout=1.5)
    start_agent(lab, "be2")
    wait_for(lambda: active(lab, "be1", "be2"), what="both active")
    leaving.send_signal(signal.SIGTERM)
    wait_for(lambda: states(lab)["be1"] == "draining", timeout=3, what="be1 draining")
    assert "be1" not in fetch(lab, 40)["served"]
    wait_for(lambda: states(lab)["be1"] == "gone", timeout=5, what="be1 gone")
    assert leaving.wait(timeout=10) == 0


def test_garbage_on_the_control_port_does_not_stop_forwarding(lab: Lab) -> None:
    start_dynamic_balancer(lab)
    start_agent(lab, "be1")
    start_agent(lab, "be2")
    wait_for(lambda: active(lab, "be1", "be2"), what="both active")
    client = fetch_in_background(lab, 300)
    host, port = control_address(lab).split(":")
    done = lab.run("client", sys.executable, HOSTILE, "garbage", host, port)
    answers = json.loads(done.stdout)
    assert {answers[k] for k in ("junk", "huge_frame", "bad_json", "bad_version")} == {"closed"}
    assert answers["slowloris_closed_after"] <= 10  # the handshake timeout, not ours
    result = fetch_result(client)
    assert result["failures"] == []
    counters = ctl(lab, "status")["control"]
    assert counters.get("timeout", 0) >= 1
    assert sum(v for k, v in counters.items() if k.startswith("protocol_")) >= 3
    assert active(lab, "be1", "be2")


def test_agents_re_register_after_the_balancer_restarts(lab: Lab) -> None:
    balancer = start_dynamic_balancer(lab)
    start_agent(lab, "be1")
    start_agent(lab, "be2")
    wait_for(lambda: active(lab, "be1", "be2"), what="both active")
    lab.stop(balancer)
    start_dynamic_balancer(lab)
    wait_for(lambda: active(lab, "be1", "be2"), timeout=20, what="re-registration")
    result = fetch(lab, 60)
    assert result["failures"] == [] and set(result["served"]) == {"be1", "be2"}


def test_active_http_checks_take_a_dead_service_out(lab: Lab) -> None:
    start_dynamic_balancer(lab, vips=[{
        "address": "10.99.0.1", "protocol": "tcp", "ports": [80],
        "health": {"kind": "http", "port": 80, "path": "/", "interval": 0.3, "timeout": 0.5,
                   "rise": 2, "fall": 2},
    }])
    start_agent(lab, "be1")
    start_agent(lab, "be2", http=False)
    wait_for(lambda: active(lab, "be1", "be2"), what="both registered")
    wait_for(lambda: ctl(lab, "status")["backends"][1]["health"] != "ok", timeout=5,
             what="be2's checks failing")
    result = fetch(lab, 60)
    assert result["failures"] == [] and set(result["served"]) == {"be1"}
    lab.start("be2", sys.executable, "-m", "caplance.lab", "http", "--name", "be2")
    wait_for(lambda: ctl(lab, "status")["backends"][1]["health"] == "ok", timeout=5,
             what="be2 healthy again (rise)")
    assert "be2" in fetch(lab, 60)["served"]


def test_an_agent_failing_its_local_check_gets_no_traffic(lab: Lab) -> None:
    flag = lab.workdir / "be1-healthy"
    flag.touch()
    start_dynamic_balancer(lab)
    start_agent(lab, "be1", health={"command": ["test", "-e", str(flag)], "interval": 0.2})
    start_agent(lab, "be2")
    wait_for(lambda: active(lab, "be1", "be2"), what="both active")
    flag.unlink()
    wait_for(lambda: ctl(lab, "status")["backends"][0]["health"] == "agent reports failure",
             timeout=5, what="be1 reporting failure")
    result = fetch(lab, 60)
    assert result["failures"] == [] and set(result["served"]) == {"be2"}


def test_ctl_socket_is_root_only(lab: Lab) -> None:
    start_dynamic_balancer(lab)
    mode = (lab.workdir / "balancer.sock").stat().st_mode & 0o777
    assert mode == 0o600
    status = lab.run("lb", *CAPLANCE, "ctl", "--socket", str(lab.workdir / "balancer.sock"), "status")
    assert "backend" in status.stdout and "state" in status.stdout
