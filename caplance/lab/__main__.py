"""Lab roles as commands, for tests and benchmarks that run them inside a lab host:

    python -m caplance.lab http --name be1 [--port 80]     # serve the name until SIGTERM
    python -m caplance.lab fetch --host VIP --count N      # JSON: every attempt and its result
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import attrs
import trio

from caplance.lab.http import fetch_many, serve_name


async def _serve(name: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_name(name, port=port, task_status=task_status))
            print("ready", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


async def _fetch(host: str, count: int, port: int, concurrency: int, timeout: float,
                 rate: float | None, body: int) -> None:
    result = await fetch_many(host, count=count, port=port, concurrency=concurrency,
                              timeout=timeout, rate=rate, body=body)
    print(json.dumps({"attempts": [attrs.asdict(a) for a in result.attempts],
                      "served": result.served, "failures": result.failures}), flush=True)


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
    args = parser.parse_args()
    if args.command == "http":
        trio.run(_serve, args.name, args.port)
    else:
        trio.run(_fetch, args.host, args.count, args.port, args.concurrency, args.timeout, args.rate, args.body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
