"""One TCP connect, or one HTTP GET, to see whether a service answers: the balancer's
active health checks and the agent's local URL check both use it."""

from __future__ import annotations

import trio

__all__ = ["probe_service"]


async def probe_service(host: str, port: int, *, http_path: str | None) -> bool:
    """TCP connect to ``host:port`` (and GET ``http_path`` if given, wanting a 2xx status).
    True if it passed. No timeout of its own: callers bound it."""
    try:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            if http_path is None:
                return True
            name = f"[{host}]" if ":" in host else host
            await stream.send_all(
                f"GET {http_path} HTTP/1.0\r\nHost: {name}\r\nUser-Agent: caplance-health\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
    except (OSError, trio.BrokenResourceError):
        return False
    parts = head.split(b" ", 2)
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1][:1] == b"2"
