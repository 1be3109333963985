"""Small non-blocking socket helpers shared by listeners, transports and the agent."""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import trio

from caplance.errors import CaplanceError
from caplance.interfaces import PacketSource
from caplance.packet import IPAddress

__all__ = ["FdSource", "SocketSource", "attach_filter", "family_of", "open_socket", "path_mtu",
           "path_mtu_toward", "pump"]

_ERROR_BACKOFF = 0.05  # seconds
_SO_ATTACH_FILTER = 26


def family_of(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def open_socket(
    family: int, kind: int, proto: int = 0, *, what: str, bind: tuple[str, int] | None = None,
    connect: tuple[str, int] | None = None,
) -> socket.socket:
    """A non-blocking socket, optionally bound and connected. ``OSError`` becomes a
    :class:`CaplanceError` saying ``what`` it was for."""
    try:
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise CaplanceError(f"cannot open {what}: {exc.strerror or exc} (needs root?)") from exc
    try:
        sock.setblocking(False)
        if bind is not None:
            sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
    except OSError as exc:
        sock.close()
        target = f" at {bind}" if bind else f" to {connect}" if connect else ""
        raise CaplanceError(f"cannot set up {what}{target}: {exc.strerror or exc}") from exc
    return sock


class SocketSource:
    """A :class:`~caplance.interfaces.PacketSource` over a non-blocking socket.

    ``receive_nowait`` is ``functools.partial(sock.recv, size)``: no Python frame per packet.
    """

    def __init__(self, sock: socket.socket, *, size: int = 65535) -> None:
        self.sock = sock
        self.receive_nowait: Callable[[], bytes] = functools.partial(sock.recv, size)

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    def close(self) -> None:
        self.sock.close()


class FdSource:
    """A :class:`~caplance.interfaces.PacketSource` over a non-blocking file descriptor (TUN)."""

    def __init__(self, fd: int, *, size: int = 65535) -> None:
        self.fd = fd
        self.receive_nowait: Callable[[], bytes] = functools.partial(os.read, fd, size)

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


async def pump(source: PacketSource, drain: Callable[[Callable[[], bytes]], bool],
               on_error: Callable[[OSError], None]) -> None:
    """Run a forwarding loop over ``source`` until cancelled.

    ``drain(receive)`` handles packets synchronously until ``receive`` raises
    ``BlockingIOError`` (it returns True: nothing is waiting, so we await readability) or it
    has done a batch (it returns False: we only checkpoint, to let other tasks run). No await
    per packet. An ``OSError`` escaping ``drain`` (say, the device went away) is passed to
    ``on_error`` and the loop backs off briefly instead of spinning.
    """
    receive = source.receive_nowait
    wait_readable = source.wait_readable
    checkpoint = trio.lowlevel.checkpoint
    while True:
        try:
            idle = drain(receive)
        except OSError as exc:
            on_error(exc)
            await trio.sleep(_ERROR_BACKOFF)
            continue
        if idle:
            await wait_readable()
        else:
            await checkpoint()


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """Attach a classic BPF ``program`` (packed ``sock_filter`` array, see
    :mod:`caplance.bpf`) to ``sock``, then discard what queued before it took effect."""
    buffer = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        raise CaplanceError(f"cannot attach BPF filter: {exc.strerror or exc}") from exc
    while True:
        try:
            sock.recv(65535)
        except BlockingIOError:
            return


_IP_MTU = 14
_IPV6_MTU = 24
_IP_MTU_DISCOVER = 10
_IP_PMTUDISC_DONT = 0


def path_mtu(sock: socket.socket) -> int:
    """The path MTU the kernel knows for a connected socket's destination (bytes, outer IP
    header included); 1500 if it cannot say."""
    try:
        if sock.family == socket.AF_INET6:
            return int(sock.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU))
        return int(sock.getsockopt(socket.IPPROTO_IP, _IP_MTU))
    except OSError:
        return 1500


def path_mtu_toward(address: IPAddress) -> int:
    """The path MTU the kernel knows toward ``address`` (outer IP header included), read from
    a UDP socket connected there (nothing is sent); 1500 if there is no route."""
    try:
        with socket.socket(family_of(address), socket.SOCK_DGRAM) as sock:
            sock.connect((str(address), 9))
            return path_mtu(sock)
    except OSError:
        return 1500


def allow_fragmentation(sock: socket.socket) -> None:
    """Let the kernel fragment this IPv4 socket's oversized packets (no DF on the outer
    header). The balancer itself answers oversized inner packets that carry DF with ICMP,
    so only packets whose sender allowed fragmentation get here oversized."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DONT)


async def open_listeners(endpoint: Any, what: str) -> list[trio.SocketListener]:
    """TCP listeners on ``endpoint`` (host, port); an ``OSError`` (say, the port is taken)
    becomes a :class:`CaplanceError` naming ``what`` and where."""
    try:
        return await trio.open_tcp_listeners(endpoint.port, host=str(endpoint.host))
    except OSError as exc:
        raise CaplanceError(f"cannot listen for the {what} on {endpoint}: {exc.strerror or exc}") from exc
