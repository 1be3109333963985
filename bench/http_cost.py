"""What does speaking HTTP through h11 cost per request? (no root: loopback)

    .venv/bin/python bench/http_cost.py [--requests 3000] [--rounds 3]

A client and a server through ``caplance.httpio`` (h11 both ways: what the lab's
``fetch_many``/``serve_name``, the health checks and ``/metrics`` use) make ``--requests``
requests, each on a new TCP connection, ``--concurrency`` at a time, as the demo and the tests
do. The baseline, in the same run, makes as many connections that carry the same bytes with no
HTTP code at all: the client writes a canned request and reads to the close, the server reads
until the blank line and writes a canned reply (what the hand-written readers did). The ratio is HTTP-through-h11 requests per
second over the baseline's: how much of a request's time is h11's (the rest is TCP and trio).
The health checks (one request per backend per ``interval``) and ``/metrics`` (one per scrape)
make far fewer requests than this.
"""

from __future__ import annotations

import sys

sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import os
import statistics
import time

import trio

from caplance.httpio import Request, Response, request, serve_connection

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # last: the standard library's selectors wins
from record import record  # bench/record.py

_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: caplance\r\nConnection: close\r\n\r\n"
_REPLY = (b"HTTP/1.1 200 \r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n"
          b"Connection: close\r\n\r\nbe1")


async def _canned_server(stream: trio.SocketStream) -> None:
    async with stream:
        seen = b""
        while b"\r\n\r\n" not in seen and (chunk := await stream.receive_some(4096)):
            seen += chunk
        await stream.send_all(_REPLY)


async def _h11_server(stream: trio.SocketStream) -> None:
    await serve_connection(stream, _respond, timeout=10)


async def _respond(_: Request) -> Response:
    return Response(200, b"be1")


async def _canned_exchange(stream: trio.SocketStream) -> None:
    await stream.send_all(_REQUEST)
    reply = b""
    while chunk := await stream.receive_some(4096):
        reply += chunk
    assert reply.endswith(b"be1"), reply


async def _h11_exchange(stream: trio.SocketStream) -> None:
    reply = await request(stream, "GET", "/", host="127.0.0.1")
    assert (reply.status, reply.body) == (200, b"be1"), reply


async def _rate(count: int, concurrency: int, *, h11: bool) -> float:
    """Requests per second, one way: the same TCP and trio work, HTTP through h11 or not."""
    server, exchange = (_h11_server, _h11_exchange) if h11 else (_canned_server, _canned_exchange)
    numbers = iter(range(count))
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await nursery.start(trio.serve_listeners, server, listeners)

        async def worker() -> None:
            for _ in numbers:  # shared: each number goes to one worker
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await exchange(stream)

        start = time.perf_counter()
        async with trio.open_nursery() as clients:
            for _ in range(concurrency):
                clients.start_soon(worker)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return count / elapsed


async def main(requests: int, rounds: int, concurrency: int) -> dict[str, float]:
    ratios: list[float] = []
    overheads: list[float] = []
    rates: list[float] = []
    for number in range(rounds):
        base = await _rate(requests, concurrency, h11=False)
        ours = await _rate(requests, concurrency, h11=True)
        ratios.append(ours / base)
        rates.append(ours)
        overheads.append((1 / ours - 1 / base) * 1e3)
        print(f"round {number + 1}: canned bytes {base:,.0f} req/s, h11 {ours:,.0f} req/s, "
              f"ratio {ours / base:.2f}")
    print(f"h11 / canned: median {statistics.median(ratios):.2f} over {rounds} rounds "
          f"({requests} requests, {concurrency} at a time); h11 adds {statistics.median(overheads):.2f} ms "
          "of CPU per request, client and server together")
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "added_ms": statistics.median(overheads), "requests_per_second": statistics.median(rates)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--record", metavar="FILE", help="write the figures into FILE (docs/figures.toml)")
    args = parser.parse_args()
    figures = trio.run(main, args.requests, args.rounds, args.concurrency)
    if args.record:
        record(args.record, "http", figures)
