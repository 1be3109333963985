"""UDP encapsulation: the whole inner IP packet is the payload of one UDP datagram.

The original Go Caplance's choice: no header of our own, nothing to parse, any host can
receive it with a plain UDP socket. It needs the Caplance agent on the backend to inject the
inner packet into the local stack. Overhead: 28 bytes over IPv4 (IP 20 + UDP 8), 48 over IPv6.
"""

from __future__ import annotations

import socket
from typing import Final

from caplance.netops import IPAddress, NetOps
from caplance.sockets import SocketSource, family_of, open_socket

__all__ = ["DEFAULT_PORT", "UdpTransport"]

DEFAULT_PORT: Final = 7001


class UdpSender:
    """A connected, non-blocking UDP socket to one backend."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send = sock.send

    def send(self, packet: bytes, key: bytes, /) -> None:
        self._send(packet)

    def close(self) -> None:
        self._sock.close()


class UdpReceiver(SocketSource):
    """The agent's side: each datagram's payload is one inner packet.

    With ``allowed`` sources, datagrams from any other address are dropped (counted in
    ``refused``): only the balancers may put packets into this host's stack.
    """

    def __init__(self, sock: socket.socket, allowed: frozenset[str]) -> None:
        super().__init__(sock)
        self.refused = 0
        if allowed:
            recvfrom = sock.recvfrom

            def receive_nowait() -> bytes:
                while True:
                    data, source = recvfrom(65535)
                    if source[0] in allowed:
                        return data
                    self.refused += 1

            self.receive_nowait = receive_nowait


class UdpTransport:
    """Transport ``udp``. Option ``port``: the agents' UDP port (default 7001)."""

    name = "udp"

    def __init__(self, *, port: int = DEFAULT_PORT, allowed_sources: frozenset[str] = frozenset()) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"udp: port must be an int from 1 to 65535, got {port!r}")
        self.port = port
        self.allowed_sources = allowed_sources

    def overhead(self, outer_version: int) -> int:
        return 28 if outer_version == 4 else 48

    def open_sender(self, backend: IPAddress) -> UdpSender:
        sock = open_socket(
            family_of(backend), socket.SOCK_DGRAM, what="UDP transport socket",
            connect=(str(backend), self.port),
        )
        return UdpSender(sock)

    def open_receiver(self, bind: IPAddress, netops: NetOps) -> UdpReceiver:
        sock = open_socket(
            family_of(bind), socket.SOCK_DGRAM, what="UDP transport receiver",
            bind=(str(bind), self.port),
        )
        netops.push_undo(f"close UDP receiver {bind}:{self.port}", sock.close)
        return UdpReceiver(sock, self.allowed_sources)
