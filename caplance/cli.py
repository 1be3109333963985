"""The ``caplance`` command: argument parsing, config loading, ``trio.run`` -- nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from caplance.agent import Agent
from caplance.balancer import Balancer
from caplance.config import load_agent_config, load_balancer_config
from caplance.errors import CaplanceError, ConfigError

__all__ = ["main"]

_STANDARD = set(vars(logging.makeLogRecord({})))


class KeyValueFormatter(logging.Formatter):
    """One structured line per event: ``level=info event="..." key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"level": record.levelname.lower(), "logger": record.name,
                                  "event": record.getMessage()}
        fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        return " ".join(f"{key}={json.dumps(value, default=str)}" for key, value in fields.items())


async def _serve(service: Balancer | Agent, stats_out: bool) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            print("ready", flush=True)
            async for _ in signals:
                service.stop()
                break
    if stats_out:
        print(json.dumps(service.stats.snapshot()), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caplance", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, what in (("balancer", "run a balancer"), ("agent", "run a backend agent")):
        command = commands.add_parser(name, help=what)
        command.add_argument("--config", required=True, help="TOML file")
        command.add_argument("--print-stats", action="store_true",
                             help="print the counters as JSON on stdout when stopping")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    try:
        service: Balancer | Agent
        if args.command == "balancer":
            service = Balancer(load_balancer_config(args.config))
        else:
            service = Agent(load_agent_config(args.config))
        trio.run(_serve, service, args.print_stats)
    except ConfigError as exc:
        print(f"caplance: invalid configuration {args.config}:", file=sys.stderr)
        for path, message in exc.problems:
            print(f"  @ {path}: {message}", file=sys.stderr)
        return 2
    except CaplanceError as exc:
        print(f"caplance: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
