"""One TCP connect, or one HTTP GET, to see whether a service answers: the balancer's
active health checks and the agent's local URL check both use it."""

from __future__ import annotations

import trio

from caplance.httpio import HttpError, request

__all__ = ["probe_service"]


async def probe_service(host: str, port: int, *, http_path: str | None) -> bool:
    """TCP connect to ``host:port`` (and GET ``http_path`` if given, wanting a 2xx status:
    only the reply's head is read, and it must be well-formed HTTP). True if it passed. No
    timeout of its own: callers bound it."""
    try:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            if http_path is None:
                return True
            reply = await request(stream, "GET", http_path, host=host, port=None if port == 80 else port,
                                  read_body=False)
    except (OSError, trio.BrokenResourceError, HttpError):
        return False
    return 200 <= reply.status < 300
