"""``caplance balancer`` started with generated configurations in a lab host: whatever the
file says, it exits 0 (started, then stopped), 1 (a one-line runtime error) or 2 (an invalid
configuration) -- never a traceback -- and leaves the host as it found it; SIGTERM stops it
(and an agent) as SIGINT does."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings

from caplance.lab import Lab
from tests.configs import any_balancer_configs
from tests.integration import services
from tests.integration.services import CAPLANCE


def start_and_stop(lab: Lab, config: dict[str, Any]) -> tuple[int, str]:
    """Run the balancer until it says ready (then SIGTERM it) or exits; (exit code, stderr)."""
    path = lab.write_config("generated", config)
    process = subprocess.Popen(lab.command("lb", *CAPLANCE, "balancer", "--config", path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + 30
    while b"ready\n" not in seen and time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 1)
        chunk = os.read(process.stdout.fileno(), 4096) if readable else b""
        if readable and not chunk:
            break  # it exited
        seen += chunk
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    return process.returncode, err.decode()


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=any_balancer_configs)
def test_any_config_starts_or_fails_cleanly(lab: Lab, data: dict[str, Any]) -> None:
    data["control_socket"] = str(lab.workdir / "generated.sock")
    before = lab.listing("lb")
    code, err = start_and_stop(lab, data)
    event(f"exit {code}")
    assert code in (0, 1, 2), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    if code != 0:
        assert err.strip().splitlines()[-1].startswith(("caplance: ", "  @ ")), err[-2000:]
    assert lab.listing("lb") == before


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("plane", ["python", "kernel"])
def test_sigterm_stops_as_sigint_does(lab: Lab, number: signal.Signals, plane: str) -> None:
    """``caplance balancer`` and ``caplance agent`` stopped by SIGTERM (a service manager,
    ``timeout``) or SIGINT (Ctrl-C): the same graceful stop -- counters printed, exit 0 -- and
    every change they made to their hosts undone."""
    services.use_plane(plane)
    try:
        roles = ("lb", "be1")
        before = {role: lab.listing(role) for role in roles}
        balancer = services.start_balancer(lab, services.balancer_config(lab, backends=("be1",)))
        agent = services.start_backend_agent(lab, "be1")
        for role in roles:  # each made changes, or this would prove nothing
            assert lab.listing(role) != before[role], role
        for process in (agent, balancer):
            process.send_signal(number)
            out, err = process.communicate(timeout=30)
            assert process.returncode == 0, err.decode()[-2000:]
            assert "Traceback" not in err.decode(), err.decode()[-3000:]
            assert out.decode().splitlines()[-1].startswith("{")  # --print-stats: the clean path's end
        for role in roles:
            assert lab.listing(role) == before[role], role
    finally:
        services.use_plane("python")
