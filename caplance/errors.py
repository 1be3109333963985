"""The exception tree: one root, specific subclasses with structured attributes."""

from __future__ import annotations


class CaplanceError(Exception):
    """Root of every error Caplance raises on purpose."""


class MalformedPacket(CaplanceError, ValueError):
    """Bytes from the network that are not a packet we can key.

    ``reason`` is a short slug (``"truncated"``, ``"bad_version"``, ...) used as the
    drop counter's name; the data plane counts these and never lets them escape.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class NetOpsError(CaplanceError):
    """A change to the host's network (address, route, sysctl, rule, device) failed.

    ``operation`` says what we tried, ``target`` on which object, ``hint`` what to do.
    """

    def __init__(self, operation: str, target: str, problem: str, hint: str = "") -> None:
        self.operation = operation
        self.target = target
        self.problem = problem
        self.hint = hint
        message = f"cannot {operation} {target}: {problem}"
        super().__init__(f"{message}; {hint}" if hint else message)


class PluginError(CaplanceError):
    """A selector or transport plugin is unknown, fails to import, or rejects its options."""

    def __init__(self, group: str, name: str, problem: str) -> None:
        self.group = group
        self.name = name
        self.problem = problem
        super().__init__(f"{group} plugin {name!r}: {problem}")


class ConfigError(CaplanceError):
    """A configuration is invalid. ``problems`` lists every ``(path, message)`` found."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"@ {path}: {msg}" for path, msg in problems))
