"""Is a control channel configured safely? Checked before anything starts.

A balancer that listens for agents needs a shared secret of at least
:data:`MIN_SECRET_BYTES` bytes (without one it would refuse every agent forever), and, when it
listens on an address other than loopback, ``allowed_networks`` saying who may register. An
agent that registers with a balancer needs the secret too. Each of these is a configuration
error (``caplance`` exits 2) unless ``insecure_control = true`` says the operator means it;
then every start logs a warning naming what is unsafe.

Pure: no sockets, no trio.
"""

from __future__ import annotations

import logging

from caplance.config import AgentConfig, BalancerConfig, Secret
from caplance.errors import ConfigError

__all__ = ["MIN_SECRET_BYTES", "control_security", "require_control_security"]

log = logging.getLogger(__name__)

#: the shortest shared secret accepted (128 bits, if it is random)
MIN_SECRET_BYTES = 16

_OVERRIDE = "set insecure_control = true to run like this anyway"


def _secret_problems(secret: Secret | None, what: str) -> list[tuple[str, str]]:
    if secret is None:
        return [("$.secret_file", (f"{what}, but no secret is set (secret_file or CAPLANCE_SECRET):"
                                   " every registration would be refused"))]
    if len(secret.value) < MIN_SECRET_BYTES:
        return [("$.secret_file", (f"the secret is {len(secret.value)} bytes; at least"
                                   f" {MIN_SECRET_BYTES} are needed (e.g. `openssl rand -hex 32`)"))]
    return []


def control_security(config: BalancerConfig | AgentConfig) -> list[tuple[str, str]]:
    """Every ``(path, problem)`` that makes ``config``'s control channel unsafe (empty: safe)."""
    if isinstance(config, BalancerConfig):
        if config.control is None:
            return []
        problems = _secret_problems(config.secret, f"control listens on {config.control}")
        host = config.control.host
        if not config.allowed_networks and not host.is_loopback:
            problems.append(("$.allowed_networks", (f"control listens on {host}, not on loopback, and"
                                                    " allowed_networks is empty: anyone who can reach it"
                                                    " may try to register; list the agents' networks")))
        return problems
    if not config.control_endpoints:
        return []
    return _secret_problems(config.secret, "the agent registers with a balancer")


def require_control_security(config: BalancerConfig | AgentConfig) -> None:
    """Raise :class:`ConfigError` for an unsafe control channel, unless ``insecure_control``
    is set: then log one warning (at every start) and go on."""
    problems = control_security(config)
    if not problems:
        return
    if config.insecure_control:
        log.warning("insecure control channel (insecure_control = true)",
                    extra={"problems": [message for _, message in problems]})
        return
    raise ConfigError([(path, f"{message}; {_OVERRIDE}") for path, message in problems])
