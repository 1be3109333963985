"""The balancer: a listener, a selector per VIP and transports, composed in one nursery.

Per packet (synchronously, in a drain loop with no await): key the flow, find its VIP, pick
the backend with the VIP's selector, encapsulate and send. Every packet is either forwarded
or counted as a drop with a reason; nothing a client sends can crash the loop.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from caplance import plugins
from caplance.config import BackendConfig, BalancerConfig, VipConfig
from caplance.errors import CaplanceError, MalformedPacket
from caplance.interfaces import Listener, PacketSender, Selector, Transport
from caplance.listeners import make_listener
from caplance.netops import IPAddress, NetOps
from caplance.packet import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PORT_PROTOCOLS,
    flow_key,
    is_new_tcp_flow,
)
from caplance.sockets import pump

__all__ = ["Balancer", "BalancerStats"]

log = logging.getLogger(__name__)

#: Packets handled per drain before letting other tasks run (a trio checkpoint costs ~9 us).
BATCH = 256


@attrs.define
class BalancerStats:
    """Counters. ``dropped`` is keyed by reason; ``forwarded*`` by backend name."""

    packets_in: int = 0
    forwarded: collections.Counter[str] = attrs.field(factory=collections.Counter)
    forwarded_bytes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    dropped: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def snapshot(self) -> dict[str, Any]:
        return {
            "packets_in": self.packets_in,
            "forwarded": dict(self.forwarded),
            "forwarded_bytes": dict(self.forwarded_bytes),
            "dropped": dict(self.dropped),
        }


@attrs.frozen
class _Vip:
    """What the data plane needs for one VIP. Replaced whole, never mutated."""

    config: VipConfig
    selector: Selector
    senders: Mapping[str, Callable[[bytes, bytes], None]]
    protocols: frozenset[int] | None  # None: every protocol
    ports: frozenset[int] | None  # None: every port


def _vip_protocols(config: VipConfig) -> frozenset[int] | None:
    if config.protocol == "any":
        return None
    main = IPPROTO_TCP if config.protocol == "tcp" else IPPROTO_UDP
    return frozenset({main, IPPROTO_ICMP, IPPROTO_ICMPV6})


class Balancer:
    """A Maglev-style balancer for the VIPs of ``config``.

    Run it with ``await nursery.start(balancer.run)``: it returns once the VIPs are attached
    and packets flow. :meth:`stop` drains and detaches. ``listener`` overrides the one the
    config names (for tests and embedding).
    """

    def __init__(self, config: BalancerConfig, *, listener: Listener | None = None) -> None:
        self.config = config
        self.stats = BalancerStats()
        self._listener = listener or make_listener(
            config.listener.kind, interface=config.listener.interface, device=config.listener.device
        )
        self._vips: dict[bytes, _Vip] = {}
        self._senders: dict[tuple[str, IPAddress, tuple[tuple[str, Any], ...]], PacketSender] = {}
        self._transports: dict[tuple[str, tuple[tuple[str, Any], ...]], Transport] = {}
        self._stop = trio.Event()
        self._admitting = True

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return. Idempotent; returns at once."""
        self._stop.set()

    @property
    def draining(self) -> bool:
        return not self._admitting

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Attach the VIPs, forward until :meth:`stop`, drain, detach everything.

        Draining: new TCP flows (SYN without ACK) are dropped, other packets still forwarded,
        until no packet arrived for ``drain_idle`` seconds or ``drain_timeout`` passed.
        On cancellation it skips the drain; either way every address, route, rule, device and
        socket it made is removed before it returns (cleanup is synchronous and bounded).
        """
        netops = NetOps()
        try:
            for vip_config in self.config.vips:
                self._install_vip(vip_config)
            sources = self._listener.open([vip.address for vip in self.config.vips], netops)
            log.info("balancer attached", extra={"vips": [str(v.address) for v in self.config.vips],
                                                 "listener": self._listener.name})
            async with trio.open_nursery() as nursery:
                for source in sources:
                    nursery.start_soon(pump, source, self._drain, self._receive_error)
                task_status.started()
                await self._stop.wait()
                await self._drain_flows()
                nursery.cancel_scope.cancel()
        finally:
            problems = netops.undo_all()
            for sender in self._senders.values():
                sender.close()
            self._senders.clear()
            log.info("balancer detached", extra={"cleanup_problems": problems})

    async def _drain_flows(self) -> None:
        self._admitting = False
        with trio.move_on_after(self.config.drain_timeout):
            seen = -1
            while seen != self.stats.packets_in:
                seen = self.stats.packets_in
                await trio.sleep(self.config.drain_idle)

    # -- backends --------------------------------------------------------------------------

    def _transport(self, backend: BackendConfig) -> Transport:
        spec = (backend.transport.name, tuple(sorted(backend.transport.options.items())))
        if spec not in self._transports:
            self._transports[spec] = plugins.make_transport(backend.transport.name, backend.transport.options)
        return self._transports[spec]

    def _sender(self, backend: BackendConfig) -> Callable[[bytes, bytes], None]:
        options = tuple(sorted(backend.transport.options.items()))
        spec = (backend.transport.name, backend.address, options)
        if spec not in self._senders:
            self._senders[spec] = self._transport(backend).open_sender(backend.address)
        return self._senders[spec].send

    def _install_vip(self, config: VipConfig) -> None:
        """Build the VIP's selector and senders and swap them in as one value."""
        selector = plugins.build_selector(
            config.selector.name, {b.name: b.weight for b in config.backends}, config.selector.options
        )
        senders: dict[str, Callable[[bytes, bytes], None]] = {
            backend.name: self._sender(backend) for backend in config.backends
        }
        self._vips[config.address.packed] = _Vip(
            config=config,
            selector=selector,
            senders=senders,
            protocols=_vip_protocols(config),
            ports=frozenset(config.ports) or None,
        )

    def vip_backends(self, address: IPAddress) -> tuple[BackendConfig, ...]:
        vip = self._vips.get(address.packed)
        if vip is None:
            raise CaplanceError(f"{address} is not a VIP of this balancer")
        return vip.config.backends

    # -- data plane ------------------------------------------------------------------------

    def _receive_error(self, exc: OSError) -> None:
        self.stats.dropped["receive_error"] += 1
        log.warning("listener receive failed", extra={"error": str(exc)})

    def _drain(self, receive: Callable[[], bytes]) -> bool:
        """Forward up to :data:`BATCH` packets. True when the source ran dry."""
        stats = self.stats
        forwarded = stats.forwarded
        forwarded_bytes = stats.forwarded_bytes
        dropped = stats.dropped
        vips = self._vips
        admitting = self._admitting
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
            if not admitting and is_new_tcp_flow(packet):
                dropped["draining"] += 1
                continue
            name = vip.selector.select(key)
            if name is None:
                dropped["no_backend"] += 1
                continue
            try:
                vip.senders[name](packet, key)
            except BlockingIOError:
                dropped["transport_busy"] += 1
                continue
            except OSError:
                dropped["transport_error"] += 1
                continue
            forwarded[name] += 1
            forwarded_bytes[name] += len(packet)
        return False
