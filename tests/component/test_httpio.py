"""caplance.httpio on loopback: the client against canned replies (good, odd and hostile), the
server against canned requests (keep-alive, HEAD, bad, oversized, slow, a failing handler)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from caplance.httpio import (
    MAX_HEAD,
    MAX_REPLY_HEAD,
    MAX_REQUESTS,
    HttpError,
    Reply,
    Request,
    Response,
    request,
    serve_connection,
)

Handle = Callable[[trio.SocketStream], Awaitable[None]]


@pytest.fixture
async def serve(nursery: trio.Nursery) -> Callable[[Handle], Awaitable[int]]:
    """Serve a connection handler on loopback; its port."""
    async def start(handle: Handle) -> int:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(trio.serve_listeners, handle, listeners)
        return int(listeners[0].socket.getsockname()[1])
    return start


def canned(reply: bytes, *, then_wait: bool = False) -> Handle:
    """A server that reads one request head, sends ``reply`` and closes (or keeps the
    connection open with ``then_wait``). The bytes are written by hand on purpose: these are
    the replies a well-behaved library would never send."""
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            seen = b""
            while b"\r\n\r\n" not in seen:
                seen += await stream.receive_some(4096)
            await stream.send_all(reply)
            if then_wait:
                await trio.sleep_forever()
    return handle


async def ask(port: int, method: str = "GET", target: str = "/", **options: object) -> Reply:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            return await request(stream, method, target, host="127.0.0.1", **options)  # type: ignore[arg-type]


async def test_client_reads_status_headers_and_body(serve: Callable[[Handle], Awaitable[int]]) -> None:
    port = await serve(canned(b"HTTP/1.1 201 Created\r\nX-Name: be1\r\nContent-Length: 5\r\n\r\nhello"))
    reply = await ask(port)
    assert (reply.status, reply.body, reply.header(b"x-name")) == (201, b"hello", b"be1")
    assert reply.header(b"missing") is None


@pytest.mark.parametrize(("raw", "body"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b"abcde"),
    (b"HTTP/1.0 200 OK\r\n\r\nuntil the close", b"until the close"),  # no length: read to EOF
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
])
async def test_client_follows_the_framing(serve: Callable[[Handle], Awaitable[int]], raw: bytes,
                                          body: bytes) -> None:
    reply = await ask(await serve(canned(raw)))
    assert (reply.status, reply.body) == (200, body)


@pytest.mark.parametrize(("raw", "options", "says"), [
    (b"nonsense\r\n\r\n", {}, "illegal status line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..", {}, "without sending complete message body"),  # closed mid-body
    (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", {"max_body": 10}, "longer than 10"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * MAX_REPLY_HEAD + b"\r\n\r\n", {}, "bad reply: Receive buffer too long"),
    (b"", {}, "closed before the reply's head ended"),  # closed before any reply
])
async def test_client_raises_http_error_for_bad_replies(serve: Callable[[Handle], Awaitable[int]], raw: bytes,
                                                        options: dict[str, Any], says: str) -> None:
    with pytest.raises(HttpError, match=says):
        await ask(await serve(canned(raw)), **options)


async def test_client_can_stop_at_the_head(serve: Callable[[Handle], Awaitable[int]]) -> None:
    """A health check reads the status only: a server still sending its page does not hold it."""
    port = await serve(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npartial", then_wait=True))
    reply = await ask(port, read_body=False)
    assert (reply.status, reply.body) == (200, b"")


async def test_client_sends_a_body_with_its_length(serve: Callable[[Handle], Awaitable[int]]) -> None:
    seen: list[Request] = []

    async def handle(asked: Request) -> Response:
        seen.append(asked)
        return Response(200, b"%d" % len(asked.body))

    port = await serve(functools.partial(serve_connection, handle=handle, timeout=5, max_body=1 << 20))
    reply = await ask(port, "POST", "/up?x=1", body=b"y" * 300_000)
    assert (reply.status, reply.body) == (200, b"300000")
    assert seen == [Request(b"POST", b"/up?x=1", b"y" * 300_000)] and seen[0].path == b"/up"


# -- the server ------------------------------------------------------------------------------


async def raw_exchange(port: int, *sends: bytes, until: int = 1) -> bytes:
    """Send each of ``sends`` in turn on one connection; everything read until the server
    closes, or until ``until`` replies came (counted by their status lines)."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            got = b""
            for data in sends:
                await stream.send_all(data)
                while got.count(b"HTTP/1.1 ") < until and (chunk := await stream.receive_some(65536)):
                    got += chunk
                until += 1
            return got


@pytest.fixture
async def echo_server(serve: Callable[[Handle], Awaitable[int]]) -> tuple[int, list[Request]]:
    """A server answering with the request's target; the requests it saw."""
    seen: list[Request] = []

    async def handle(asked: Request) -> Response:
        seen.append(asked)
        if asked.target == b"/boom":
            raise RuntimeError("the handler broke")
        if asked.target == b"/nocontent":
            return Response(204, b"a body HTTP does not allow on a 204")
        return Response(200, asked.target, headers=((b"X-Method", asked.method),))

    port = await serve(functools.partial(serve_connection, handle=handle, timeout=0.5, max_body=10))
    return port, seen


async def test_server_keeps_the_connection_alive(echo_server: tuple[int, list[Request]]) -> None:
    port, seen = echo_server
    got = await raw_exchange(port, b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.count(b"HTTP/1.1 200 ") == 2 and got.endswith(b"/two")
    assert [r.target for r in seen] == [b"/one", b"/two"]


async def test_server_closes_after_connection_close_and_http_1_0(echo_server: tuple[int, list[Request]]) -> None:
    port, _ = echo_server
    for ask_ in (b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"GET /a HTTP/1.0\r\n\r\n"):
        got = await raw_exchange(port, ask_, until=2)  # returns only because the server closed
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"/a")


async def test_server_answers_head_without_the_body(echo_server: tuple[int, list[Request]]) -> None:
    port, _ = echo_server
    reply = await ask(port, "HEAD", "/abc")
    assert (reply.status, reply.body, reply.header(b"content-length")) == (200, b"", b"4")
    assert reply.header(b"x-method") == b"HEAD"


@pytest.mark.parametrize(("sent", "status"), [
    (b"garbage\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * (2 * MAX_HEAD), 431),  # a head that never ends
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * MAX_HEAD + b"\r\n\r\n", 431),  # whole, in one piece
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n", 413),  # refused before the body
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world", 413),  # max_body 10
])
async def test_server_refuses_bad_requests_and_closes(echo_server: tuple[int, list[Request]], sent: bytes,
                                                      status: int) -> None:
    port, seen = echo_server
    got = await raw_exchange(port, sent, until=2)
    assert got.startswith(b"HTTP/1.1 %d " % status)
    assert b"connection: close" in got.lower() and seen == []


async def test_server_answers_a_failing_handler_with_500_and_goes_on(
        echo_server: tuple[int, list[Request]], caplog: pytest.LogCaptureFixture) -> None:
    port, _ = echo_server
    with caplog.at_level(logging.WARNING, logger="caplance.httpio"):
        assert (await ask(port, "GET", "/boom")).status == 500
    assert any("handler failed" in r.message and "the handler broke" in str(r.exc_info) for r in caplog.records)
    assert (await ask(port, "GET", "/fine")).body == b"/fine"


async def test_server_drops_a_slow_client(echo_server: tuple[int, list[Request]]) -> None:
    """A request must arrive whole within ``timeout`` (0.5 s): half a head is closed on."""
    port, seen = echo_server
    with trio.fail_after(3):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /slow HTTP/1.1\r\nHo")
            assert await stream.receive_some(4096) == b""
    assert seen == []


async def test_server_closes_an_idle_kept_alive_connection(echo_server: tuple[int, list[Request]]) -> None:
    port, _ = echo_server
    with trio.fail_after(3):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while not got.endswith(b"/x"):
                got += await stream.receive_some(4096)
            assert await stream.receive_some(4096) == b""  # closed after the idle timeout


async def test_many_clients_at_once(serve: Callable[[Handle], Awaitable[int]]) -> None:
    async def handle(asked: Request) -> Response:
        await trio.sleep(0.01)
        return Response(200, asked.target)

    port = await serve(functools.partial(serve_connection, handle=handle, timeout=5))
    replies: dict[int, bytes] = {}

    async def one(number: int) -> None:
        replies[number] = (await ask(port, "GET", f"/{number}")).body

    async with trio.open_nursery() as nursery:
        for number in range(50):
            nursery.start_soon(one, number)
    assert replies == {n: f"/{n}".encode() for n in range(50)}



async def test_server_logs_an_answer_http_does_not_allow(echo_server: tuple[int, list[Request]],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    port, _ = echo_server
    with caplog.at_level(logging.WARNING, logger="caplance.httpio"):
        got = await raw_exchange(port, b"GET /nocontent HTTP/1.1\r\nHost: x\r\n\r\n", until=2)
    assert got == b""  # nothing half-sent: the connection is closed
    assert any("does not allow" in r.message for r in caplog.records)


async def test_server_says_the_reason_phrase(echo_server: tuple[int, list[Request]]) -> None:
    port, _ = echo_server
    assert (await raw_exchange(port, b"GET /x HTTP/1.0\r\n\r\n", until=2)).startswith(b"HTTP/1.1 200 OK\r\n")


async def test_server_answers_100_continue(echo_server: tuple[int, list[Request]]) -> None:
    port, seen = echo_server
    with trio.fail_after(3):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            got = b""
            while b"\r\n\r\n" not in got:
                got += await stream.receive_some(4096)
            assert got.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"hello")
            while not got.endswith(b"/up"):
                got += await stream.receive_some(4096)
    assert seen == [Request(b"POST", b"/up", b"hello")]


async def test_server_closes_after_max_requests_on_one_connection(echo_server: tuple[int, list[Request]]) -> None:
    """Pipelined requests are answered in turn, but one connection gets at most MAX_REQUESTS."""
    port, seen = echo_server
    many = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(MAX_REQUESTS + 20))
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(many)
            got = b""
            while chunk := await stream.receive_some(65536):  # until the server closes
                got += chunk
    assert got.count(b"HTTP/1.1 200 OK") == MAX_REQUESTS == len(seen)
    assert got.lower().count(b"connection: close") == 1 and got.endswith(b"/%d" % (MAX_REQUESTS - 1))


async def test_server_gives_up_on_a_client_that_never_reads() -> None:
    """The deadline covers sending the answer: a client that asks and never reads (here the
    answer can only go out as fast as it reads) does not hold the server's task."""
    client, server = trio.testing.lockstep_stream_pair()
    answered: list[bytes] = []

    async def handle(asked: Request) -> Response:
        answered.append(asked.target)
        return Response(200, b"x" * 100_000)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(3):
            await serve_connection(server, handle, timeout=0.3)
        nursery.cancel_scope.cancel()
    assert answered == [b"/x"]
