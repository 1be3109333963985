"""The balancer: a listener, a selector per VIP and transports, composed in one nursery.

Per packet (synchronously, in a drain loop with no await): key the flow, find its VIP, pick
the backend with the VIP's selector, encapsulate and send. Every packet is either forwarded
or counted as a drop with a reason; nothing a client sends can crash the loop.

The backend set changes (agents registering, health, operators) only through
:meth:`Balancer.apply` and friends: they update the :class:`~caplance.membership.Membership`
and mark the VIP dirty; a rebuild task builds the new selector in a worker thread (off the
forwarding path) and swaps it in as one value between two checkpoints.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from caplance import control_codec as codec
from caplance import plugins
from caplance.config import BalancerConfig, PluginConfig, VipConfig
from caplance.conntrack import FlowTable
from caplance.control import serve_agents
from caplance.ctl import serve_ctl
from caplance.errors import CaplanceError, MalformedPacket
from caplance.health import run_health_checks
from caplance.interfaces import Listener, PacketSender, Selector, Transport
from caplance.listeners import make_listener
from caplance.membership import Member, Membership, State, Transition
from caplance.metrics import serve_metrics
from caplance.netops import IPAddress, NetOps, largest_link_mtu
from caplance.packet import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PORT_PROTOCOLS,
    dont_fragment,
    flow_key,
    icmp_too_big,
    is_new_tcp_flow,
    segment_tcp,
    tcp_flags,
)
from caplance.sockets import pump

__all__ = ["Balancer", "BalancerStats"]

log = logging.getLogger(__name__)

#: Packets handled per drain before letting other tasks run (a trio checkpoint costs ~9 us).
BATCH = 256
#: ICMP "too big" answers: at most this many per second, in bursts of at most ICMP_BURST
ICMP_RATE = 50.0
ICMP_BURST = 50
#: seconds a gone backend stays listed (in ``caplance ctl status``) before it is forgotten
FORGET_GONE_AFTER = 300.0

_SenderKey = tuple[str, tuple[tuple[str, Any], ...], IPAddress]


@attrs.define
class BalancerStats:
    """Counters. ``dropped`` is keyed by reason; ``forwarded*`` by backend name."""

    packets_in: int = 0
    #: oversized packets without DF, sent on in fragmented outer packets
    outer_fragmented: int = 0
    #: ICMP "fragmentation needed" / "packet too big" sent back to clients
    icmp_too_big: int = 0
    #: TCP aggregates (GRO/GSO) cut into segments before sending
    segmented: int = 0
    forwarded: collections.Counter[str] = attrs.field(factory=collections.Counter)
    forwarded_bytes: collections.Counter[str] = attrs.field(factory=collections.Counter)
    dropped: collections.Counter[str] = attrs.field(factory=collections.Counter)
    control: collections.Counter[str] = attrs.field(factory=collections.Counter)
    flows: FlowTable | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "conntrack": self.flows.snapshot() if self.flows is not None else None,
            "packets_in": self.packets_in,
            "outer_fragmented": self.outer_fragmented,
            "icmp_too_big": self.icmp_too_big,
            "segmented": self.segmented,
            "forwarded": dict(self.forwarded),
            "forwarded_bytes": dict(self.forwarded_bytes),
            "dropped": dict(self.dropped),
            "control": dict(self.control),
        }


@attrs.frozen
class _Vip:
    """What the data plane needs for one VIP. Replaced whole, never mutated."""

    config: VipConfig
    selector: Selector
    #: backend name -> (send, largest inner packet that fits the path MTU encapsulated)
    senders: Mapping[str, tuple[Callable[[bytes, bytes], object], int]]
    protocols: frozenset[int] | None  # None: every protocol
    ports: frozenset[int] | None  # None: every port


def _vip_protocols(config: VipConfig) -> frozenset[int] | None:
    if config.protocol == "any":
        return None
    main = IPPROTO_TCP if config.protocol == "tcp" else IPPROTO_UDP
    return frozenset({main, IPPROTO_ICMP, IPPROTO_ICMPV6})


def _sender_key(transport: PluginConfig, address: IPAddress) -> _SenderKey:
    return (transport.name, tuple(sorted(transport.options.items())), address)


class Balancer:
    """A Maglev-style balancer for the VIPs of ``config``.

    Run it with ``await nursery.start(balancer.run)``: it returns once the VIPs are attached
    and packets flow. :meth:`stop` drains and detaches. ``listener`` overrides the one the
    config names and ``transports`` (name -> transport) shadow plugins of those names, for
    tests and embedding.
    """

    def __init__(self, config: BalancerConfig, *, listener: Listener | None = None,
                 transports: Mapping[str, Transport] | None = None) -> None:
        self.config = config
        self.stats = BalancerStats()
        self.membership = Membership()
        self._listener = listener or make_listener(
            config.listener.kind, interface=config.listener.interface, device=config.listener.device
        )
        self._vip_configs = {vip.address: vip for vip in config.vips}
        self._vips: dict[bytes, _Vip] = {}
        self._senders: dict[_SenderKey, PacketSender] = {}
        self._transports: dict[tuple[str, tuple[tuple[str, Any], ...]], Transport] = {}
        self._transport_overrides = dict(transports or {})
        self._stop = trio.Event()
        self._admitting = True
        conntrack = config.conntrack
        #: the flow table; None when connection tracking is off
        self.flows = FlowTable(
            max_flows=conntrack.max_flows, tcp_timeout=conntrack.tcp_timeout,
            closing_timeout=conntrack.tcp_closing_timeout, other_timeout=conntrack.udp_timeout,
        ) if conntrack.enabled else None
        self.stats.flows = self.flows
        self._icmp_sockets: dict[int, socket.socket] = {}
        #: no packet from a link can be longer than this; longer ones are aggregates
        self._wire_mtu = 65535
        self._icmp_tokens = float(ICMP_BURST)
        self._icmp_refilled = time.monotonic()
        self._dirty: set[IPAddress] = set()
        self._dirty_event = trio.Event()
        self._rebuilding = False
        self.rebuilds = 0
        #: registered agents' control sessions: name -> push a message to that agent (None:
        #: close the session)
        self.sessions: dict[str, Callable[[dict[str, Any] | None], None]] = {}
        for vip in config.vips:
            for backend in vip.backends:
                if backend.name in self.membership:
                    existing = self.membership.get(backend.name)
                    existing.vips += (vip.address,)
                    continue
                member = Member(name=backend.name, address=backend.address, transport=backend.transport,
                                vips=(vip.address,), weight=backend.weight, static=True, state=State.ACTIVE)
                self.membership.add(member, 0.0)  # static: no heartbeats to time

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return. Idempotent; returns at once."""
        self._stop.set()

    @property
    def draining(self) -> bool:
        return not self._admitting

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Attach the VIPs, forward until :meth:`stop`, drain, detach everything.

        Draining: new flows are dropped (with connection tracking: every packet the flow table
        does not know; without it: TCP SYNs), the others still forwarded, until no packet
        arrived for ``drain_idle`` seconds or ``drain_timeout`` passed.
        On cancellation it skips the drain; either way every address, route, rule, device and
        socket it made is removed before it returns (cleanup is synchronous and bounded).
        """
        netops = NetOps()
        try:
            for address in self._vip_configs:  # static backends: a sender that fails is fatal
                self._vips[address.packed] = self._build_vip(address, self._build_selector(address), strict=True)
            self._close_unused_senders()
            self._open_icmp_sockets(netops)
            self._wire_mtu = largest_link_mtu(exclude={"lo", self.config.listener.device})
            sources = self._listener.open(list(self._vip_configs), netops)
            log.info("balancer attached", extra={"vips": [str(v) for v in self._vip_configs],
                                                 "listener": self._listener.name})
            async with trio.open_nursery() as nursery:
                for source in sources:
                    nursery.start_soon(pump, source, self._drain, self._receive_error)
                nursery.start_soon(self._rebuilder)
                if self.flows is not None:
                    nursery.start_soon(self._expire_flows, self.flows)
                nursery.start_soon(self._watchdog)
                for vip in self.config.vips:
                    if vip.health is not None:
                        nursery.start_soon(run_health_checks, self, vip.address, vip.health)
                if self.config.control is not None:
                    await nursery.start(serve_agents, self, netops)
                await nursery.start(serve_ctl, self, netops)
                if self.config.metrics is not None:
                    await nursery.start(serve_metrics, self)
                task_status.started()
                await self._stop.wait()
                await self._drain_flows()
                nursery.cancel_scope.cancel()
        finally:
            problems = netops.undo_all()
            for sender in self._senders.values():
                try:
                    sender.close()
                except Exception as exc:  # noqa: BLE001 - close the others regardless
                    problems.append(f"close sender: {exc!r}")
            self._senders.clear()
            log.info("balancer detached", extra={"cleanup_problems": problems})

    async def _drain_flows(self) -> None:
        self._admitting = False
        with trio.move_on_after(self.config.drain_timeout):
            seen = -1
            while seen != self.stats.packets_in:
                seen = self.stats.packets_in
                await trio.sleep(self.config.drain_idle)

    # -- membership changes ----------------------------------------------------------------

    def log_transition(self, change: Transition | None) -> None:
        """The one structured log line a state change gets; marks its VIPs for a rebuild."""
        if change is None:
            return
        log.info("backend state change", extra={
            "backend": change.name, "from": change.old.value, "to": change.new.value,
            "reason": change.reason,
        })
        if change.name not in self.membership:
            return
        member = self.membership.get(change.name)
        self.mark_dirty(member.vips)
        notify = self.sessions.get(change.name)
        if notify is None or change.new is change.old:
            return
        if change.new is State.GONE and not member.leaving:
            notify(None)  # lost, not sent away: close the session; the agent may come back
        else:
            notify(codec.message("state", state=change.new.value))

    def mark_dirty(self, vips: tuple[IPAddress, ...]) -> None:
        self._dirty.update(vip for vip in vips if vip in self._vip_configs)
        self._dirty_event.set()

    def add_member(self, member: Member) -> None:
        """Add a backend (in state registering: it gets no traffic until activated)."""
        if member.name in self.membership:  # a re-registration: the old VIPs need rebuilding
            self.mark_dirty(self.membership.get(member.name).vips)
        for change in self.membership.add(member, trio.current_time()):
            self.log_transition(change)
        self.log_transition(Transition(member.name, State.GONE, member.state, "registered"))

    def set_state(self, name: str, state: State, reason: str, *, drain_timeout: float | None = None,
                  by_operator: bool = False) -> None:
        """Move backend ``name`` to ``state``. Raises :class:`MembershipError`.

        ``by_operator`` drains and deregistrations are final: the agent is told it is gone
        and does not register again. Other losses (heartbeats, connection) only close its
        session, and it comes back when it can.
        """
        now = trio.current_time()
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        deadline = now + timeout if state is State.DRAINING else None
        if by_operator and state in (State.DRAINING, State.GONE):
            self.membership.get(name).leaving = True
        self.log_transition(self.membership.transition(name, state, now, reason, drain_deadline=deadline))

    def heartbeat(self, name: str, healthy: bool) -> None:
        self.log_transition(self.membership.heartbeat(name, trio.current_time(), healthy))

    def set_check_health(self, name: str, healthy: bool) -> None:
        if name in self.membership:
            self.log_transition(self.membership.set_check_health(name, healthy))

    def status_extra(self) -> dict[str, Any]:
        """More for ``caplance ctl status``: the flow table's counters, when it is on."""
        return {"conntrack": self.flows.snapshot() if self.flows is not None else "off"}

    def vip_members(self, address: IPAddress) -> list[Member]:
        return [m for m in self.membership.for_vip(address) if m.state is not State.GONE]

    def vip_config(self, address: IPAddress) -> VipConfig:
        try:
            return self._vip_configs[address]
        except KeyError:
            raise CaplanceError(f"{address} is not a VIP of this balancer") from None

    @staticmethod
    async def _expire_flows(flows: FlowTable) -> None:
        while True:
            await trio.sleep(1.0)
            flows.expire(trio.current_time())

    async def _watchdog(self) -> None:
        """Expire silent backends and finished drains; forget gone ones after a while."""
        period = self.config.heartbeat_timeout / 4
        while True:
            await trio.sleep(period)
            for change in self.membership.expire(trio.current_time(), self.config.heartbeat_timeout):
                self.log_transition(change)
            self.membership.forget_gone(trio.current_time(), after=FORGET_GONE_AFTER)

    # -- selectors: built off the forwarding path, swapped in whole ------------------------

    def _build_selector(self, address: IPAddress) -> Selector:
        vip = self._vip_configs[address]
        return plugins.build_selector(vip.selector.name, self.membership.weights(address), vip.selector.options)

    @property
    def rebuild_pending(self) -> bool:
        """True while a membership change has not yet reached the data plane."""
        return bool(self._dirty) or self._rebuilding

    async def _rebuilder(self) -> None:
        while True:
            self._rebuilding = False
            await self._dirty_event.wait()
            self._rebuilding = True
            self._dirty_event = trio.Event()
            dirty, self._dirty = self._dirty, set()
            for address in sorted(dirty, key=str):
                weights = self.membership.weights(address)
                vip = self._vip_configs[address]
                try:
                    selector = await trio.to_thread.run_sync(
                        lambda: plugins.build_selector(vip.selector.name, weights, vip.selector.options))
                except Exception as exc:  # noqa: BLE001 - a plugin's bug must not stop the balancer
                    log.error("selector rebuild failed; keeping the previous one",
                              extra={"vip": str(address), "error": repr(exc)})
                    continue
                # Membership may have moved on while we built; the next round catches up.
                self._vips[address.packed] = self._build_vip(address, selector)
                self.rebuilds += 1
                log.info("selector rebuilt", extra={"vip": str(address), "backends": weights})
            self._close_unused_senders()

    def _build_vip(self, address: IPAddress, selector: Selector, *, strict: bool = False) -> _Vip:
        config = self._vip_configs[address]
        senders: dict[str, tuple[Callable[[bytes, bytes], object], int]] = {}
        for member in self.membership.for_vip(address):
            if member.in_selector:
                try:
                    sender = self.sender(member.transport, member.address)
                    senders[member.name] = (sender.send, sender.max_packet)
                except CaplanceError as exc:
                    if strict:
                        raise
                    log.error("cannot open sender", extra={"backend": member.name, "error": str(exc)})
        return _Vip(config=config, selector=selector, senders=senders,
                    protocols=_vip_protocols(config), ports=frozenset(config.ports) or None)

    def transport(self, spec: PluginConfig) -> Transport:
        if spec.name in self._transport_overrides:
            return self._transport_overrides[spec.name]
        key = (spec.name, tuple(sorted(spec.options.items())))
        if key not in self._transports:
            self._transports[key] = plugins.make_transport(spec.name, spec.options)
        return self._transports[key]

    def sender(self, spec: PluginConfig, address: IPAddress) -> PacketSender:
        """The (shared) sender to ``address`` over transport ``spec``."""
        key = _sender_key(spec, address)
        if key not in self._senders:
            self._senders[key] = self.transport(spec).open_sender(address)
        return self._senders[key]

    def _close_unused_senders(self) -> None:
        used = {_sender_key(m.transport, m.address) for m in self.membership.members()
                if m.state is not State.GONE}
        for key in [key for key in self._senders if key not in used]:
            self._senders.pop(key).close()

    # -- data plane ------------------------------------------------------------------------

    def _send_segmented(self, packet: bytes, key: bytes, name: str,
                        send: Callable[[bytes, bytes], object], limit: int) -> None:
        """A TCP packet bigger than any link here is a GRO/GSO aggregate (a raw listener
        sees those): cut it into segments that fit, rather than refuse it."""
        try:
            ip_header = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
            headers = ip_header + (packet[ip_header + 12] >> 4) * 4
            segments = segment_tcp(packet, min(limit, self._wire_mtu) - headers)
        except (MalformedPacket, IndexError, ValueError):
            self.stats.dropped["too_big_unsegmentable"] += 1
            return
        self.stats.segmented += 1
        for segment in segments:
            try:
                send(segment, key)
            except OSError:
                self.stats.dropped["transport_error"] += 1
                return
            self.stats.forwarded[name] += 1
            self.stats.forwarded_bytes[name] += len(segment)

    def _answer_too_big(self, packet: bytes, limit: int) -> None:
        """Tell the client the packet does not fit (rate limited: a token bucket of
        :data:`ICMP_RATE` per second, :data:`ICMP_BURST` deep)."""
        now = time.monotonic()
        self._icmp_tokens = min(ICMP_BURST, self._icmp_tokens + (now - self._icmp_refilled) * ICMP_RATE)
        self._icmp_refilled = now
        if self._icmp_tokens < 1:
            self.stats.dropped["icmp_rate_limited"] += 1
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
            self.stats.dropped["icmp_send_failed"] += 1
            log.debug("cannot send ICMP too big", extra={"error": str(exc)})
            return
        self.stats.icmp_too_big += 1

    def _open_icmp_sockets(self, netops: NetOps) -> None:
        for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            try:
                sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            except OSError as exc:
                log.warning("no raw socket for ICMP errors", extra={"version": version, "error": str(exc)})
                continue
            sock.setblocking(False)
            netops.push_undo(f"close ICMPv{version} socket", sock.close)
            self._icmp_sockets[version] = sock

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
        table = self.flows
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
            if table is None:
                if not admitting and is_new_tcp_flow(packet):
                    dropped["draining"] += 1
                    continue
                name = vip.selector.select(key)
            else:
                name = table.lookup(key, tcp_flags(packet) if proto == IPPROTO_TCP else None, now)
                if name is None:
                    if not admitting:
                        dropped["draining"] += 1
                        continue
                    name = vip.selector.select(key)
                    if name is not None:
                        table.insert(key, name, now)
                elif name not in vip.senders:  # its backend failed or left: the flow re-hashes
                    name = vip.selector.select(key)
                    if name is not None:
                        table.reassign(key, name)
            if name is None:
                dropped["no_backend"] += 1
                continue
            target = vip.senders.get(name)
            if target is None:  # chosen by a selector built just before its backend left
                dropped["no_sender"] += 1
                continue
            send, limit = target
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

