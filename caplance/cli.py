"""The ``caplance`` command: argument parsing, config loading, ``trio.run`` -- nothing else.

Exit codes: 0 success, 1 a runtime error (printed as one line, no traceback), 2 an invalid
configuration or command line (every problem listed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import tomli_w
import trio

from caplance import plugins
from caplance.config import SECRET_ENV, AgentConfig, BalancerConfig, unstructure
from caplance.configfile import load, read_toml
from caplance.errors import CaplanceError, ConfigError

__all__ = ["build_parser", "main", "show"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    """One structured line per event: ``ts=... level=info event="..." key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": round(record.created, 3), "level": record.levelname.lower(),
            "logger": record.name, "event": record.getMessage(),
        }
        fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return " ".join(f"{key}={json.dumps(value, default=str)}" for key, value in fields.items())


def config_kind(path: str) -> type[BalancerConfig] | type[AgentConfig]:
    """An agent's file has a top-level ``name``; a balancer's has none."""
    return AgentConfig if "name" in read_toml(path) else BalancerConfig


def load_checked(path: str, kind: type[BalancerConfig] | type[AgentConfig]) -> BalancerConfig | AgentConfig:
    """Load and validate, plugins' options included. Raises :class:`ConfigError`."""
    config = load(path, kind)
    problems = plugins.check_plugins(config)
    if problems:
        raise ConfigError(problems)
    return config


async def _serve(service: Any, stats_out: bool) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            print("ready", flush=True)
            async for _ in signals:
                service.stop()
                break
    if stats_out:
        print(json.dumps(service.snapshot()), flush=True)


def _run_service(args: argparse.Namespace) -> int:
    from caplance.agent import Agent
    from caplance.balancer import Balancer

    if args.command == "balancer":
        service: Any = Balancer(load_checked(args.config, BalancerConfig))  # type: ignore[arg-type]
    else:
        service = Agent(load_checked(args.config, AgentConfig))  # type: ignore[arg-type]
    trio.run(_serve, service, args.print_stats)
    return 0


def _config(args: argparse.Namespace) -> int:
    kind = {"balancer": BalancerConfig, "agent": AgentConfig}.get(args.kind) or config_kind(args.file)
    config = load_checked(args.file, kind)
    role = kind.__name__.removesuffix("Config").lower()
    if args.action == "check":
        print(f"{args.file}: valid {role} configuration")
    else:
        print(show(config, args.file, role), end="")
    return 0


def show(config: BalancerConfig | AgentConfig, source: str, role: str) -> str:
    """The effective configuration as TOML that loads back to the same ``config``.

    The secret is never printed: a comment says whether one is set and where from.
    """
    data = unstructure(config)
    data.pop("secret", None)
    if config.secret is None:
        secret = "# secret: none (set CAPLANCE_SECRET or secret_file)"
    elif os.environ.get(SECRET_ENV):
        secret = f'# secret = "***"  (from {SECRET_ENV}; never shown)'
    else:
        secret = f'# secret = "***"  (from secret_file {config.secret_file}; never shown)'
    header = f"# {role} configuration from {source}, environment applied\n{secret}\n\n"
    return header + tomli_w.dumps(data)


def _ctl(args: argparse.Namespace) -> int:
    from caplance.control.ctl import format_status, send_command

    command_args: list[Any] = [] if args.ctl_command in ("status", "drain-balancer") else [args.name]
    if getattr(args, "timeout", None) is not None:
        command_args.append(args.timeout)
    result = trio.run(send_command, args.socket, args.ctl_command, command_args)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.ctl_command == "status":
        print(format_status(result))
    else:
        print(result)
    return 0


_EPILOG = """\
Configuration: one TOML file per balancer or agent. Every key can be overridden by an
environment variable, CAPLANCE_ + the key's path in upper case joined by __ (list items by
their number): CAPLANCE_LISTENER__KIND=raw, CAPLANCE_VIPS__0__PORTS='[80, 443]'. The shared
secret comes only from CAPLANCE_SECRET or the file named by secret_file.

Exit codes: 0 success; 1 a runtime error (one line on stderr, no traceback); 2 an invalid
configuration (every problem listed as "@ $.path: message") or command line."""


def build_parser() -> argparse.ArgumentParser:
    """The ``caplance`` argument parser (the docs' CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(prog="caplance", description="Caplance: a layer-4 load balancer on trio.",
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log verbosity (structured lines on stderr)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, what, description in (
        ("balancer", "run a balancer",
         ("Run a balancer: attach the VIPs, forward their packets to the backends, serve agents and"
         " caplance ctl. Prints 'ready' on stdout once packets flow. SIGTERM or SIGINT: drain, then"
         " remove every address, route, rule and device it made.")),
        ("agent", "run a backend agent",
         ("Run a backend agent: put the VIPs on the loopback, receive encapsulated packets and inject"
         " them; with a balancer address, register and send heartbeats. Prints 'ready' on stdout."
         " SIGTERM or SIGINT: drain, deregister, undo every change.")),
    ):
        command = commands.add_parser(name, help=what, description=description)
        command.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
        command.add_argument("--print-stats", action="store_true",
                             help="print the counters as JSON on stdout when stopping")
    ctl = commands.add_parser("ctl", help="operate a running balancer",
                              description="Operate a running balancer over its unix socket (root only).")
    ctl.add_argument("--socket", default=BalancerConfig.__attrs_attrs__.control_socket.default,
                     help="the balancer's control_socket (default: %(default)s)")
    ctl.add_argument("--json", action="store_true", help="print the raw result as JSON")
    ctl_commands = ctl.add_subparsers(dest="ctl_command", required=True, metavar="ACTION")
    ctl_commands.add_parser("status", help="backends: state, weight, health, packets, bytes, heartbeat")
    for action, what in (("pause", "weight 0: no new flows"), ("resume", "back to its weight"),
                         ("drain", "pause, then deregister after a deadline"),
                         ("deregister", "remove now (its flows re-hash)"),
                         ("release", "free a backend name held by an agent (the next agent to register"
                                     " under it, from anywhere, gets it)")):
        sub = ctl_commands.add_parser(action, help=what, description=what)
        sub.add_argument("name", metavar="NAME")
        if action == "drain":
            sub.add_argument("--timeout", type=float, help="seconds (default: the balancer's drain_timeout)")
    switch = ctl_commands.add_parser("fastpath", help="detach (off) or attach again (on) the kernel data plane",
                                     description="Detach (off) or attach again (on) the kernel data plane: its"
                                                 " maps and flow table stay; meanwhile the Python plane forwards.")
    switch.add_argument("name", metavar="on|off", choices=["on", "off"])
    ctl_commands.add_parser("drain-balancer", help="stop the balancer gracefully: withdraw, drain, detach",
                            description="Stop the balancer as SIGTERM does: admit no new flows, withdraw the"
                                        " VIPs' announcements, wait withdraw_grace, drain, detach.")
    config = commands.add_parser(
        "config", help="check or show a configuration",
        description="Validate a configuration without starting anything: the file, the CAPLANCE_*"
                    " environment variables and the options of every selector and transport it names."
                    " Invalid: every problem is listed on stderr and the exit code is 2.")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, what in (
        ("check", "validate FILE, with the environment applied and the plugins' options checked"),
        ("show", ("print the effective configuration as TOML (environment applied, defaults filled"
                 " in, the secret never shown)")),
    ):
        sub = actions.add_parser(action, help=what, description=what[0].upper() + what[1:] + ".")
        sub.add_argument("file", metavar="FILE", help="TOML configuration file")
        sub.add_argument("--kind", choices=["balancer", "agent"],
                         help="what FILE configures (default: agent if FILE has a top-level name,"
                              " else balancer)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    try:
        if args.command in ("balancer", "agent"):
            return _run_service(args)
        if args.command == "config":
            return _config(args)
        if args.command == "ctl":
            return _ctl(args)
        raise AssertionError(args.command)
    except BaseExceptionGroup as group:  # a service's nursery wraps what stopped it
        return _report(args, _first_leaf(group))
    except CaplanceError as exc:
        return _report(args, exc)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error inside trio's exception groups; re-raise unless it is a CaplanceError."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    if not isinstance(leaf, CaplanceError):
        raise group
    return leaf


def _report(args: argparse.Namespace, exc: BaseException) -> int:
    """Print a CaplanceError as the CLI does: no traceback; exit 2 for config, 1 otherwise."""
    if isinstance(exc, ConfigError):
        source = getattr(args, "config", None) or getattr(args, "file", "")
        print(f"caplance: invalid configuration {source}:", file=sys.stderr)
        for path, message in exc.problems:
            print(f"  @ {path}: {message}", file=sys.stderr)
        return 2
    print(f"caplance: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
