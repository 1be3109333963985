"""The /metrics server on loopback under hostile use: more connections than it serves at once
are closed as they come, and it serves again once they are gone."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from caplance.config import Endpoint
from caplance.control import metrics
from caplance.httpio import request


class Source:
    def status(self) -> dict[str, Any]:
        return {}


async def free_port() -> int:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_connections_over_the_cap_are_closed(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "render", lambda status: "caplance_up 1\n")
    port = await free_port()
    await nursery.start(metrics.serve_metrics, Source(), Endpoint.parse(f"127.0.0.1:{port}"))
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(metrics.MAX_CONNECTIONS)]
    await trio.sleep(0.2)  # all accepted and waiting for a request
    with trio.fail_after(2):  # well before the 5 s request timeout: closed as it came
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        async with extra:
            assert await extra.receive_some(4096) == b""
    for stream in idle:
        await stream.aclose()
    await trio.sleep(0.2)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            reply = await request(stream, "GET", "/metrics", host="127.0.0.1")
    assert (reply.status, reply.body) == (200, b"caplance_up 1\n")
