"""Lab roles as commands, for tests and benchmarks that run them inside a lab host:

    python -m caplance.lab http --name be1 [--port 80]     # serve the name until SIGTERM
    python -m caplance.lab echo --name be1 [--port 8080]   # name, then echo, until SIGTERM
    python -m caplance.lab udp-name --name be1 --address VIP [--port 9999]
    python -m caplance.lab fetch --host VIP --count N [--attempts]   # JSON: served, failed (and every attempt)
    python -m caplance.lab streams --host VIP --count 50 --seconds 10   # JSON per connection
    python -m caplance.lab ask-udp --host VIP --ports 20000-20099       # JSON port -> name
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
from typing import Any

import attrs
import trio

from caplance.lab.http import (
    ask_udp,
    fetch_many,
    hold_streams,
    serve_echo,
    serve_name,
    serve_udp_name,
)


async def _serve(serve: Any) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            print("ready", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


async def _fetch(host: str, count: int, port: int, concurrency: int, timeout: float,
                 rate: float | None, body: int, sources: list[str], keep: bool) -> None:
    """One JSON line: ``served`` (name -> requests), ``failed`` (how many), ``failures``
    (the first KEPT_FAILURES of them) and, with ``keep``, ``attempts`` (every request)."""
    result = await fetch_many(host, count=count, port=port, concurrency=concurrency,
                              timeout=timeout, rate=rate, body=body, sources=sources, keep=keep)
    print(json.dumps({"attempts": [attrs.asdict(a) for a in result.attempts], "served": result.served,
                      "failed": result.failed, "failures": result.failures}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m caplance.lab")
    commands = parser.add_subparsers(dest="command", required=True)
    http = commands.add_parser("http")
    http.add_argument("--name", required=True)
    http.add_argument("--port", type=int, default=80)
    fetch = commands.add_parser("fetch")
    fetch.add_argument("--host", required=True)
    fetch.add_argument("--count", type=int, default=100)
    fetch.add_argument("--port", type=int, default=80)
    fetch.add_argument("--concurrency", type=int, default=16)
    fetch.add_argument("--timeout", type=float, default=5.0)
    fetch.add_argument("--rate", type=float, help="start at most this many requests per second")
    fetch.add_argument("--body", type=int, default=0, help="POST this many bytes instead of a GET")
    fetch.add_argument("--sources", default="", help="comma-separated source addresses, used in turn")
    fetch.add_argument("--attempts", action="store_true",
                       help="also print every request (memory grows with --count)")
    echo = commands.add_parser("echo")
    echo.add_argument("--name", required=True)
    echo.add_argument("--port", type=int, default=8080)
    udp_name = commands.add_parser("udp-name")
    udp_name.add_argument("--name", required=True)
    udp_name.add_argument("--address", required=True)
    udp_name.add_argument("--port", type=int, default=9999)
    streams = commands.add_parser("streams")
    streams.add_argument("--host", required=True)
    streams.add_argument("--count", type=int, default=50)
    streams.add_argument("--port", type=int, default=8080)
    streams.add_argument("--seconds", type=float, default=10.0)
    streams.add_argument("--interval", type=float, default=0.1)
    ask = commands.add_parser("ask-udp")
    ask.add_argument("--host", required=True)
    ask.add_argument("--ports", required=True, help="FIRST-LAST source ports")
    ask.add_argument("--port", type=int, default=9999)
    args = parser.parse_args()
    if args.command == "http":
        trio.run(_serve, functools.partial(serve_name, args.name, port=args.port))
    elif args.command == "echo":
        trio.run(_serve, functools.partial(serve_echo, args.name, port=args.port))
    elif args.command == "udp-name":
        trio.run(_serve, functools.partial(serve_udp_name, args.name, args.address, port=args.port))
    elif args.command == "streams":
        result = trio.run(functools.partial(hold_streams, args.host, count=args.count, port=args.port,
                                            seconds=args.seconds, interval=args.interval))
        print(json.dumps([attrs.asdict(s) for s in result]), flush=True)
    elif args.command == "ask-udp":
        first, _, last = args.ports.partition("-")
        answers = trio.run(functools.partial(ask_udp, args.host, range(int(first), int(last or first) + 1),
                                             port=args.port))
        print(json.dumps(answers), flush=True)
    else:
        trio.run(_fetch, args.host, args.count, args.port, args.concurrency, args.timeout, args.rate, args.body,
                 [source for source in args.sources.split(",") if source], args.attempts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
