"""The lab's HTTP client against a small server on loopback: it counts rather than keeps, runs
``concurrency`` requests at a time with as many tasks whatever the number of requests, and
keeps every request only when asked."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest
import trio

from caplance.httpio import Request, Response, serve_connection
from caplance.lab.http import KEPT_FAILURES, Attempt, FetchResult, fetch_many


@attrs.define
class Server:
    """Answers with a name from one of ``names`` in turn; with ``fail_every`` N, every Nth
    connection gets a 500 instead. Counts connections open at once and who connected."""

    port: int = 0
    names: tuple[str, ...] = ("a", "b")
    fail_every: int = 0
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    peers: dict[str, int] = attrs.field(factory=dict)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        peer = stream.socket.getpeername()[0]
        self.peers[peer] = self.peers.get(peer, 0) + 1

        async def respond(_: Request) -> Response:
            await trio.sleep(0.002)  # long enough for the client's other requests to pile up
            if self.fail_every and number % self.fail_every == 0:
                return Response(500, b"oops")
            return Response(200, self.names[number % len(self.names)].encode())

        try:
            await serve_connection(stream, respond, timeout=10)
        finally:
            self.open_now -= 1


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    made = Server()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    made.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, made.handle, listeners)
        yield made
        nursery.cancel_scope.cancel()


async def fetch(server: Server, count: int, **options: object) -> FetchResult:
    with trio.fail_after(60):
        return await fetch_many("127.0.0.1", port=server.port, count=count, timeout=10, **options)  # type: ignore[arg-type]


async def test_counts_without_keeping_requests(server: Server) -> None:
    result = await fetch(server, 300, concurrency=8)
    assert result.served == {"a": 150, "b": 150}
    assert result.failed == 0 and result.failures == [] and result.requests == 300
    assert result.attempts == []  # keep=False (the default): no per-request record
    assert server.connections == 300


async def test_keeps_the_first_failures_and_counts_all(server: Server) -> None:
    server.fail_every = 2
    result = await fetch(server, 2 * KEPT_FAILURES + 100, concurrency=8)
    assert result.failed == KEPT_FAILURES + 50
    assert len(result.failures) == KEPT_FAILURES
    assert all("unexpected reply: status 500" in failure for failure in result.failures)
    assert sum(result.served.values()) == KEPT_FAILURES + 50 and set(result.served) == {"b"}
    assert result.attempts == []


async def test_keep_records_every_request(server: Server) -> None:
    server.fail_every = 5
    result = await fetch(server, 50, concurrency=4, keep=True, sources=("127.0.0.1", "127.0.0.2"))
    assert len(result.attempts) == 50 and all(isinstance(a, Attempt) for a in result.attempts)
    assert sum(1 for a in result.attempts if a.served_by is None) == result.failed == 10
    # a new connection each (a port may repeat across the two source addresses)
    assert len({(a.source, a.source_port) for a in result.attempts}) == 50
    assert {a.source for a in result.attempts} == {"127.0.0.1", "127.0.0.2"}
    assert server.peers == {"127.0.0.1": 25, "127.0.0.2": 25}  # the sources in turn


@pytest.mark.parametrize("concurrency", [1, 5, 16])
async def test_concurrency_tasks_whatever_the_count(server: Server, concurrency: int) -> None:
    """As many tasks as ``concurrency``, never one per request: memory does not grow with
    ``count`` (one task per request made 3 million requests take over 10 GB)."""
    most_tasks = 0
    done = trio.Event()
    results: list[FetchResult] = []

    async def client() -> None:
        results.append(await fetch(server, 400, concurrency=concurrency))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        (task,) = [t for t in nursery.child_tasks if t.name.endswith("client")]
        while not done.is_set():
            most_tasks = max([most_tasks, *(len(inner.child_tasks) for inner in task.child_nurseries)])
            await trio.sleep(0.001)
    assert 0 < most_tasks <= concurrency
    if concurrency > 1:
        assert server.most_open > 1  # they really ran at once
    assert results[0].requests == 400 and results[0].failed == 0
