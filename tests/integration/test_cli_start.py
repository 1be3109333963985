"""``caplance balancer`` started with generated configurations in a lab host: whatever the
file says, it exits 0 (started, then stopped), 1 (a one-line runtime error) or 2 (an invalid
configuration) -- never a traceback -- and leaves the host as it found it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from typing import Any

from hypothesis import HealthCheck, event, given, settings

from caplance.lab import Lab
from tests.configs import any_balancer_configs
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
