"""The Python data plane: the drain loop, forwarding by the latest :class:`ForwardingTable`.

Per packet (synchronously, in a drain loop with no await): key the flow, find its VIP, look
the flow up in the flow table or pick its backend from the VIP's lookup table
(``ids[flow_hash(key, seed) % size]``, exactly as the kernel data plane does), encapsulate
and send. Every packet is either forwarded or counted as a drop with a reason; nothing a
client sends can crash the loop.

It is also the reference model: the BPF data plane must send the same bytes to the same
backend for every packet it handles, and pass up what it does not.

:meth:`PythonDataPlane.apply` swaps a new table in between two packets (trio runs one task
at a time); it opens senders for new backends and closes those of backends that left. The
data plane owns its sockets: the control plane never touches them.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import mmh3
import trio

from caplance import plugins
from caplance.config import ConntrackConfig, PluginConfig
from caplance.conntrack import FlowTable
from caplance.dataplane.stats import DataPlaneStats
from caplance.errors import CaplanceError, MalformedPacket
from caplance.forwarding import BackendEntry, ForwardingTable, LookupTable, VipFlags
from caplance.interfaces import Listener, PacketSender, PacketSource, Transport
from caplance.netops import largest_link_mtu
from caplance.packet import (
    IPPROTO_TCP,
    PORT_PROTOCOLS,
    dont_fragment,
    flow_key,
    icmp_too_big,
    is_new_tcp_flow,
    segment_tcp,
    tcp_flags,
)
from caplance.sockets import pump

__all__ = ["BATCH", "PythonDataPlane"]

log = logging.getLogger(__name__)

#: Packets handled per drain before letting other tasks run (a trio checkpoint costs ~9 us).
BATCH = 256
#: ICMP "too big" answers: at most this many per second, in bursts of at most ICMP_BURST
ICMP_RATE = 50.0
ICMP_BURST = 50

_SenderKey = tuple[str, tuple[tuple[str, Any], ...], Any]


@attrs.frozen
class _Vip:
    """One VIP, compiled for the loop."""

    slots: memoryview | None  # a lookup table's ids, or None: ask ``choose``
    size: int
    seed: int
    choose: Callable[[bytes], int] | None
    protocols: frozenset[int] | None  # None: every protocol
    ports: frozenset[int] | None  # None: every port
    members: frozenset[int]
    closed: bool

    def pick(self, key: bytes) -> int:
        if self.slots is not None:
            return int(self.slots[mmh3.hash(key, self.seed, False) % self.size])
        assert self.choose is not None
        return self.choose(key)


def _sender_key(entry: BackendEntry) -> _SenderKey:
    transport = entry.transport
    return (transport.name, tuple(sorted((k, repr(v)) for k, v in transport.options.items())), entry.address)


class PythonDataPlane:
    """Forwards the packets ``listener`` delivers (its share ``worker`` of ``workers``).

    ``transports`` (name -> transport) shadow plugins of those names, for tests and
    embedding. The first table applied before :meth:`run` starts is checked strictly: a
    backend whose sender cannot be opened (a static backend from the config) stops
    :meth:`run` with that error.
    """

    name = "python"

    def __init__(self, listener: Listener, conntrack: ConntrackConfig, *,
                 transports: Mapping[str, Transport] | None = None, worker: int = 0, workers: int = 1) -> None:
        self.listener = listener
        self.worker = worker
        self.workers = workers
        self.counters = DataPlaneStats()
        #: the flow table; None when connection tracking is off
        self.flows = FlowTable(
            max_flows=conntrack.max_flows, tcp_timeout=conntrack.tcp_timeout,
            closing_timeout=conntrack.tcp_closing_timeout, other_timeout=conntrack.udp_timeout,
        ) if conntrack.enabled else None
        self.table = ForwardingTable()
        self._vips: dict[bytes, _Vip] = {}
        #: backend id -> (send, largest inner packet, name)
        self._targets: dict[int, tuple[Callable[[bytes, bytes], object], int, str]] = {}
        self._senders: dict[_SenderKey, PacketSender] = {}
        self._keys: dict[int, _SenderKey] = {}  # backend id -> its sender's key
        self._sender_errors: dict[int, CaplanceError] = {}
        self._transports: dict[tuple[str, tuple[tuple[str, Any], ...]], Transport] = {}
        self._overrides = dict(transports or {})
        self._icmp_sockets: dict[int, socket.socket] = {}
        self._sources: list[PacketSource] = []
        #: no packet from a link can be longer than this; longer ones are aggregates
        self._wire_mtu = 65535
        self._icmp_tokens = float(ICMP_BURST)
        self._icmp_refilled = time.monotonic()

    # -- the table -------------------------------------------------------------------------

    def apply(self, table: ForwardingTable) -> None:
        """Forward by ``table`` from the next packet on."""
        targets: dict[int, tuple[Callable[[bytes, bytes], object], int, str]] = {}
        wanted: set[_SenderKey] = set()
        previous = self.table.backends
        for number, entry in table.backends.items():
            if previous.get(number) is entry and number in self._targets:  # unchanged: keep it as it is
                targets[number] = self._targets[number]
                wanted.add(self._keys[number])
                continue
            key = self._keys[number] = _sender_key(entry)
            wanted.add(key)
            sender = self._senders.get(key)
            if sender is None:
                try:
                    sender = self._senders[key] = self._transport(entry.transport).open_sender(entry.address)
                except Exception as exc:  # noqa: BLE001 - a transport plugin's failure costs one backend
                    error = exc if isinstance(exc, CaplanceError) else CaplanceError(
                        f"cannot open a {entry.transport.name} sender to {entry.name} ({entry.address}): {exc!r}")
                    self._sender_errors[number] = error
                    log.error("cannot open sender", extra={"backend": entry.name, "error": str(error)})
                    continue
            self._sender_errors.pop(number, None)
            targets[number] = (sender.send, entry.max_packet, entry.name)
        for number in [n for n in self._keys if n not in table.backends]:
            del self._keys[number]
        vips = {}
        for address, vip in table.vips.items():
            choice = vip.choice
            ports = frozenset(vip.ports) or None
            closed = bool(vip.flags & VipFlags.CLOSED)
            if isinstance(choice, LookupTable):
                vips[address.packed] = _Vip(choice.slots(), choice.size, choice.seed, None, vip.protocols,
                                            ports, vip.members, closed)
            else:
                vips[address.packed] = _Vip(None, 0, 0, choice.entry, vip.protocols, ports, vip.members, closed)
        self._targets, self._vips, self.table = targets, vips, table
        for key in [key for key in self._senders if key not in wanted]:
            self._senders.pop(key).close()

    def _transport(self, spec: PluginConfig) -> Transport:
        if spec.name in self._overrides:
            return self._overrides[spec.name]
        key = (spec.name, tuple(sorted((k, repr(v)) for k, v in spec.options.items())))
        if key not in self._transports:
            self._transports[key] = plugins.make_transport(spec.name, spec.options)
        return self._transports[key]

    def stats(self) -> dict[str, Any]:
        snapshot = self.counters.snapshot()
        for source in self._sources:  # drops a listener's sources count themselves
            for reason, count in getattr(source, "dropped", {}).items():
                snapshot["dropped"][reason] = snapshot["dropped"].get(reason, 0) + count
        snapshot["conntrack"] = self.flows.snapshot() if self.flows is not None else None
        return snapshot

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the listener's sources and forward until cancelled; every socket is closed
        on the way out. Raises the first sender error of the table it started with."""
        if self._sender_errors:
            raise next(iter(self._sender_errors.values()))
        sources = self._sources = list(self.listener.open(self.worker, self.workers))
        try:
            self._open_icmp_sockets()
            self._wire_mtu = largest_link_mtu(exclude={"lo", getattr(self.listener, "device", "lo")})
            async with trio.open_nursery() as nursery:
                for source in sources:
                    nursery.start_soon(pump, source, self._drain, self._receive_error)
                if self.flows is not None:
                    nursery.start_soon(self._expire_flows, self.flows)
                task_status.started()
        finally:
            closeables: list[Any] = [*sources, *self._senders.values(), *self._icmp_sockets.values()]
            for closeable in closeables:
                try:
                    closeable.close()
                except Exception as exc:  # noqa: BLE001 - close the others regardless
                    log.warning("close failed", extra={"error": repr(exc)})
            self._senders.clear()
            self._icmp_sockets.clear()

    @staticmethod
    async def _expire_flows(flows: FlowTable) -> None:
        while True:
            await trio.sleep(1.0)
            flows.expire(trio.current_time())

    def _open_icmp_sockets(self) -> None:
        for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            try:
                sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            except OSError as exc:
                log.warning("no raw socket for ICMP errors", extra={"version": version, "error": str(exc)})
                continue
            sock.setblocking(False)
            self._icmp_sockets[version] = sock

    def _receive_error(self, exc: OSError) -> None:
        self.counters.dropped["receive_error"] += 1
        log.warning("listener receive failed", extra={"error": str(exc)})

    # -- the slow cases ----------------------------------------------------------------------

    def _send_segmented(self, packet: bytes, key: bytes, name: str,
                        send: Callable[[bytes, bytes], object], limit: int) -> None:
        """A TCP packet bigger than any link here is a GRO/GSO aggregate (a raw listener
        sees those): cut it into segments that fit, rather than refuse it."""
        stats = self.counters
        try:
            ip_header = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
            headers = ip_header + (packet[ip_header + 12] >> 4) * 4
            segments = segment_tcp(packet, min(limit, self._wire_mtu) - headers)
        except (MalformedPacket, IndexError, ValueError):
            stats.dropped["too_big_unsegmentable"] += 1
            return
        stats.segmented += 1
        for segment in segments:
            try:
                send(segment, key)
            except OSError:
                stats.dropped["transport_error"] += 1
                return
            stats.forwarded[name] += 1
            stats.forwarded_bytes[name] += len(segment)

    def _answer_too_big(self, packet: bytes, limit: int) -> None:
        """Tell the client the packet does not fit (rate limited: a token bucket of
        :data:`ICMP_RATE` per second, :data:`ICMP_BURST` deep)."""
        now = time.monotonic()
        self._icmp_tokens = min(ICMP_BURST, self._icmp_tokens + (now - self._icmp_refilled) * ICMP_RATE)
        self._icmp_refilled = now
        if self._icmp_tokens < 1:
            self.counters.dropped["icmp_rate_limited"] += 1
            return
        self._icmp_tokens -= 1
        sock = self._icmp_sockets.get(packet[0] >> 4)
        try:
            reply = icmp_too_big(packet, limit)
            if sock is None:
                raise OSError("no raw socket for ICMP")
            sock.sendto(reply, (socket.inet_ntop(sock.family, reply[16:20] if packet[0] >> 4 == 4
                                                 else reply[24:40]), 0))
        except (OSError, MalformedPacket) as exc:
            self.counters.dropped["icmp_send_failed"] += 1
            log.debug("cannot send ICMP too big", extra={"error": str(exc)})
            return
        self.counters.icmp_too_big += 1

    # -- the loop ----------------------------------------------------------------------------

    def _drain(self, receive: Callable[[], bytes]) -> bool:
        """Forward up to :data:`BATCH` packets. True when the source ran dry."""
        stats = self.counters
        forwarded = stats.forwarded
        forwarded_bytes = stats.forwarded_bytes
        dropped = stats.dropped
        vips = self._vips
        targets = self._targets
        table = self.flows
        hash32 = mmh3.hash
        now = trio.current_time()
        for _ in range(BATCH):
            try:
                packet = receive()
            except BlockingIOError:
                return True
            stats.packets_in += 1
            try:
                key = flow_key(packet)
            except MalformedPacket as exc:
                dropped["malformed_" + exc.reason] += 1
                log.debug("malformed packet", extra={"reason": str(exc)})
                continue
            vip = vips.get(key[4:8] if len(key) == 13 else key[16:32])
            if vip is None:
                dropped["not_a_vip"] += 1
                continue
            width = 8 if len(key) == 13 else 32
            proto = key[width]
            if vip.protocols is not None and proto not in vip.protocols:
                dropped["protocol_not_served"] += 1
                continue
            if vip.ports is not None and proto in PORT_PROTOCOLS:
                port = (key[width + 3] << 8) | key[width + 4]
                if port and port not in vip.ports:  # port 0: a fragment, keyed without ports
                    dropped["port_not_served"] += 1
                    continue
            slots = vip.slots
            if table is None:
                if vip.closed and is_new_tcp_flow(packet):
                    dropped["draining"] += 1
                    continue
                number = slots[hash32(key, vip.seed, False) % vip.size] if slots is not None else vip.pick(key)
            else:
                found = table.lookup(key, tcp_flags(packet) if proto == IPPROTO_TCP else None, now)
                if found is None:
                    if vip.closed:
                        dropped["draining"] += 1
                        continue
                    number = slots[hash32(key, vip.seed, False) % vip.size] if slots is not None else vip.pick(key)
                    if number:
                        table.insert(key, number, now)
                elif found not in vip.members:  # its backend failed or left: the flow re-hashes
                    number = vip.pick(key)
                    if number:
                        table.reassign(key, number)
                else:
                    number = found
            if not number:
                dropped["no_backend"] += 1
                continue
            target = targets.get(number)
            if target is None:  # chosen by a selector built just before its backend left
                dropped["no_sender"] += 1
                continue
            send, limit, name = target
            if len(packet) > limit:
                if len(packet) > self._wire_mtu and proto == IPPROTO_TCP:
                    self._send_segmented(packet, key, name, send, limit)
                    continue
                if dont_fragment(packet):
                    dropped["too_big"] += 1
                    self._answer_too_big(packet, limit)
                    continue
                stats.outer_fragmented += 1  # the sender allowed it: the kernel fragments
            try:
                send(packet, key)
            except BlockingIOError:
                dropped["transport_busy"] += 1
                continue
            except OSError:
                dropped["transport_error"] += 1
                continue
            forwarded[name] += 1
            forwarded_bytes[name] += len(packet)
        return False
