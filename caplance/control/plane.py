"""The control plane: who the backends are, and what to forward, published as tables.

It owns the :class:`~caplance.control.membership.Membership` (static backends from the
config, agents as they register), backend ids, selector rebuilds, the agent sessions, health
checks, ``caplance ctl`` and the metrics endpoint. It never touches a data plane's sockets or
maps: it publishes :class:`~caplance.forwarding.ForwardingTable` values, and every data plane
(:class:`TableConsumer`) applies them.

Membership changes are an event stream (:meth:`Membership.subscribe`): the control plane's
own subscriber logs each change once, marks the VIPs it concerns for a rebuild and tells the
backend's agent session; announcers subscribe the same way. A rebuild round builds the dirty
VIPs' selectors off the forwarding path (:mod:`caplance.control.rebuild`) and then publishes
one new table.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import trio

from caplance import control_codec as codec
from caplance import plugins
from caplance.config import BalancerConfig, PluginConfig, VipConfig
from caplance.control.announce import AnnouncementGate, Announcer
from caplance.control.ctl import serve_ctl
from caplance.control.health import run_health_checks
from caplance.control.identity import NameBindings, Refusals
from caplance.control.membership import FORGOTTEN, Member, Membership, State, Transition
from caplance.control.metrics import serve_metrics
from caplance.control.rebuild import ProcessBuilder, TableBuilder
from caplance.control.sessions import Notify, serve_agents
from caplance.dataplane.stats import merge
from caplance.errors import CaplanceError
from caplance.forwarding import (
    BackendEntry,
    BackendIds,
    ForwardingTable,
    LookupTable,
    SelectorChoice,
    TableLog,
    VipEntry,
    VipFlags,
)
from caplance.interfaces import Transport
from caplance.netops import IPAddress, NetOps
from caplance.sockets import path_mtu_toward

__all__ = ["FORGET_GONE_AFTER", "ControlPlane", "TableConsumer"]

log = logging.getLogger(__name__)

#: seconds a gone backend stays listed (in ``caplance ctl status``) before it is forgotten
FORGET_GONE_AFTER = 300.0


class TableConsumer(Protocol):
    """A data plane, as the control plane sees it."""

    def apply(self, table: ForwardingTable) -> None:
        """Forward by ``table`` from now on (synchronous: a swap, or a message queued)."""
        ...

    def stats(self) -> dict[str, Any]:
        """A snapshot of its counters (plain data; see :mod:`caplance.dataplane.stats`)."""
        ...


def _transport_key(spec: PluginConfig) -> tuple[str, tuple[tuple[str, Any], ...]]:
    return spec.name, tuple(sorted((key, repr(value)) for key, value in spec.options.items()))


class ControlPlane:
    """The control plane of one balancer. ``transports`` (name -> transport) shadow plugins
    of those names; ``builder`` builds selectors (default: a child process)."""

    def __init__(self, config: BalancerConfig, *, transports: Mapping[str, Transport] | None = None,
                 builder: TableBuilder | None = None, announcer: Announcer | None = None) -> None:
        self.config = config
        self.membership = Membership()
        #: control-plane events: registrations, refusals, timeouts, ctl errors
        self.counters: collections.Counter[str] = collections.Counter()
        #: registered agents' sessions: name -> push a message to that agent
        self.sessions: dict[str, Notify] = {}
        #: backend names bound to the agent that holds them (see :mod:`caplance.control.identity`)
        self.names = NameBindings()
        #: refused and failed registrations, by source address and reason
        self.refusals = Refusals()
        self.rebuilds = 0
        #: switches the composition offers ctl (``fastpath``): name -> set it on or off
        self.switches: dict[str, Callable[[bool], str]] = {}
        self._builder: TableBuilder = builder or ProcessBuilder()
        self._vips = {vip.address: vip for vip in config.vips}
        self._ids = BackendIds()
        self._choices: dict[IPAddress, LookupTable | SelectorChoice] = {}
        self._consumers: list[TableConsumer] = []
        self._log = TableLog()
        self._transports: dict[tuple[str, tuple[tuple[str, Any], ...]], Transport] = {}
        self._overrides = dict(transports or {})
        self._dirty: set[IPAddress] = set()
        self._dirty_event = trio.Event()
        self._rebuilding = False
        self._admitting = True
        self._nursery: trio.Nursery | None = None
        announce = config.announce
        #: which VIPs to announce, and the announcer that does it
        self.announcements = AnnouncementGate(
            announcer or plugins.make_announcer(announce.kind, announce.options), list(self._vips),
            self.membership, min_backends=announce.min_backends, settle=announce.settle)
        self.membership.subscribe(self._on_change)
        for vip in config.vips:
            for backend in vip.backends:
                if backend.name in self.membership:
                    self.membership.get(backend.name).vips += (vip.address,)
                    continue
                self.membership.add(Member(
                    name=backend.name, address=backend.address, transport=backend.transport,
                    vips=(vip.address,), weight=backend.weight, static=True, state=State.ACTIVE,
                    kernel_decap=backend.decap == "kernel"), 0.0)

    # -- running ---------------------------------------------------------------------------

    async def run(self, netops: NetOps, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Build every VIP's selector and publish the first table, then serve agents, ctl,
        health checks and metrics until cancelled. Ready (``task_status.started()``) once
        the first table is out and every listener is bound. Raises
        :class:`~caplance.errors.CaplanceError` when a static configuration cannot be built."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if isinstance(self._builder, ProcessBuilder):
                await nursery.start(self._builder.run)
            await nursery.start(self.announcements.announcer.run)
            for address in self._vips:  # a selector that cannot build its static backends is fatal
                self._choices[address] = await self._build(address)
            self._publish()
            nursery.start_soon(self._rebuilder)
            nursery.start_soon(self._watchdog)
            for vip in self.config.vips:
                if vip.health is not None:
                    nursery.start_soon(run_health_checks, self, vip.address, vip.health)
            if self.config.control is not None:
                await nursery.start(serve_agents, self, netops)
            await nursery.start(serve_ctl, self, self.config.control_socket, netops)
            if self.config.metrics is not None:
                await nursery.start(serve_metrics, self, self.config.metrics)
            task_status.started()

    def add_consumer(self, consumer: TableConsumer) -> None:
        """Send every table from now on to ``consumer`` (a data plane), the current one first."""
        self._consumers.append(consumer)
        if self._choices:
            consumer.apply(self.table)

    @property
    def table(self) -> ForwardingTable:
        """The latest published table."""
        return self._log.latest

    @property
    def admitting(self) -> bool:
        return self._admitting

    def stop_admitting(self) -> None:
        """Publish a table that admits no new flows and withdraw every VIP (the first steps of a
        graceful stop)."""
        if self._admitting:
            self._admitting = False
            self._publish()
            self.announcements.admitting = False
            self.announcements.update()

    def set_forwarding(self, forwarding: bool) -> None:
        """Whether the data planes are attached and forwarding (the VIPs may be announced, once
        the backend set has settled: see :class:`AnnouncementGate`)."""
        if forwarding and not self.announcements.forwarding and self._nursery is not None:
            self._nursery.start_soon(self.announcements.run_settling)
        self.announcements.forwarding = forwarding
        self.announcements.update()

    @property
    def rebuild_pending(self) -> bool:
        """True while a membership change has not yet reached the data planes."""
        return bool(self._dirty) or self._rebuilding

    # -- membership, for sessions, health checks and ctl ------------------------------------

    def _on_change(self, change: Transition) -> None:
        """The control plane's subscriber: one log line, a rebuild, the agent told."""
        if change.reason == FORGOTTEN:
            self._ids.release(change.name)
            self.names.release(change.name)
            return
        log.info("backend state change", extra={
            "backend": change.name, "from": change.old.value, "to": change.new.value,
            "reason": change.reason})
        self.mark_dirty(change.vips)
        if (change.new is State.ACTIVE and change.old is not State.ACTIVE
                and self.announcements.settling_until is not None):
            self.announcements.joined(trio.current_time())
        self.announcements.update()
        notify = self.sessions.get(change.name)
        if notify is None or change.new is change.old or change.name not in self.membership:
            return
        member = self.membership.get(change.name)
        if change.new is State.GONE and member.leaving:
            self.names.release(change.name)  # sent away by an operator: the name is free
        if change.new is State.GONE and not member.leaving:
            notify(None)  # lost, not sent away: close the session; the agent may come back
        else:
            notify(codec.message("state", state=change.new.value))

    def mark_dirty(self, vips: tuple[IPAddress, ...]) -> None:
        self._dirty.update(vip for vip in vips if vip in self._vips)
        self._dirty_event.set()

    def add_member(self, member: Member) -> None:
        """Add a backend (in state registering: it gets no traffic until activated)."""
        self.membership.add(member, trio.current_time())

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
        self.membership.transition(name, state, now, reason, drain_deadline=deadline)

    def release(self, name: str) -> str:
        """Unbind ``name`` from the agent that holds it (``caplance ctl release``): the next
        agent to register under it, from anywhere, gets it. Raises :class:`CaplanceError`."""
        holder = self.names.release(name)
        if holder is None:
            raise CaplanceError(f"{name} is not held by any agent")
        log.warning("backend name released by operator", extra={"backend": name, "holder": holder.describe()})
        return f"{name}: released (was held by {holder.describe()})"

    def heartbeat(self, name: str, healthy: bool) -> None:
        self.membership.heartbeat(name, trio.current_time(), healthy)

    def set_check_health(self, name: str, healthy: bool) -> None:
        if name in self.membership:
            self.membership.set_check_health(name, healthy)

    def vip_members(self, address: IPAddress) -> list[Member]:
        return [m for m in self.membership.for_vip(address) if m.state is not State.GONE]

    def vip_config(self, address: IPAddress) -> VipConfig:
        try:
            return self._vips[address]
        except KeyError:
            raise CaplanceError(f"{address} is not a VIP of this balancer") from None

    def transport(self, spec: PluginConfig) -> Transport:
        """The transport ``spec`` names (shared per name and options). Raises
        :class:`~caplance.errors.PluginError` for an unknown one or bad options."""
        if spec.name in self._overrides:
            return self._overrides[spec.name]
        key = _transport_key(spec)
        if key not in self._transports:
            self._transports[key] = plugins.make_transport(spec.name, spec.options)
        return self._transports[key]

    async def _watchdog(self) -> None:
        """Expire silent backends and finished drains; forget gone ones after a while."""
        period = self.config.heartbeat_timeout / 4
        while True:
            await trio.sleep(period)
            self.membership.expire(trio.current_time(), self.config.heartbeat_timeout)
            self.membership.forget_gone(trio.current_time(), after=FORGET_GONE_AFTER)

    # -- rebuilding and publishing ----------------------------------------------------------

    async def _build(self, address: IPAddress) -> LookupTable | SelectorChoice:
        weights = self.membership.weights(address)
        ids = {name: self._ids.hold(name) for name in weights}
        return await self._builder.build(self._vips[address].selector, weights, ids)

    async def _rebuilder(self) -> None:
        while True:
            self._rebuilding = False
            await self._dirty_event.wait()
            self._rebuilding = True
            self._dirty_event = trio.Event()
            dirty, self._dirty = self._dirty, set()
            for address in sorted(dirty, key=str):
                try:
                    self._choices[address] = await self._build(address)
                except Exception as exc:  # noqa: BLE001 - a plugin's bug must not stop the balancer
                    log.error("selector rebuild failed; keeping the previous one",
                              extra={"vip": str(address), "error": repr(exc)})
                    continue
                self.rebuilds += 1
                log.info("selector rebuilt", extra={"vip": str(address),
                                                    "backends": self.membership.weights(address)})
            # Membership may have moved on while we built; the next round catches up.
            self._publish()

    def _publish(self) -> None:
        """Make the next table from the membership and the built selectors; hand it to every
        data plane."""
        previous = self.table
        backends: dict[int, BackendEntry] = {}
        for member in self.membership.members():
            if not member.in_selector:
                continue
            number = self._ids.hold(member.name)
            old = previous.backends.get(number)
            if old is not None and (old.name, old.address, old.transport, old.kernel_decap) == (
                    member.name, member.address, member.transport, member.kernel_decap):
                backends[number] = old
            else:
                backends[number] = BackendEntry(id=number, name=member.name, address=member.address,
                                                transport=member.transport, max_packet=self._max_packet(member),
                                                kernel_decap=member.kernel_decap)
        flags = VipFlags.NONE if self._admitting else VipFlags.CLOSED
        vips = {}
        for address, config in self._vips.items():
            held = (self._ids.get(m.name) for m in self.membership.for_vip(address) if m.in_selector)
            vips[address] = VipEntry(address=address, protocol=config.protocol, ports=frozenset(config.ports),
                                     selector=config.selector.name, choice=self._choices[address],
                                     members=frozenset(number for number in held if number is not None),
                                     flags=flags)
        table = ForwardingTable(version=previous.version + 1, vips=vips, backends=backends)
        self._log.publish(table)
        for consumer in self._consumers:
            consumer.apply(table)

    def _max_packet(self, member: Member) -> int:
        """The largest inner packet that fits the path to ``member`` once encapsulated."""
        transport = self.transport(member.transport)
        limit = getattr(transport, "max_packet", None)
        if callable(limit):
            return int(limit(member.address))
        return path_mtu_toward(member.address) - transport.overhead(member.address.version)

    # -- status, for ctl and metrics --------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``caplance ctl status`` reply (the metrics endpoint renders the same)."""
        now = trio.current_time()
        snapshots = [consumer.stats() for consumer in self._consumers]
        counters = merge(snapshots)
        conntrack = counters.pop("conntrack", None)
        dataplane = counters.pop("dataplane", {})
        fastpath = counters.pop("fastpath", {"mode": "off"})
        forwarded = counters.get("forwarded", {})
        sent_bytes = counters.get("forwarded_bytes", {})
        rows = []
        for member in self.membership.members():
            holder = self.names.get(member.name)
            rows.append({
                "backend": member.name,
                "address": str(member.address),
                "registered_from": None if holder is None else holder.peer,
                "vips": [str(v) for v in member.vips],
                "state": member.state.value,
                "weight": member.weight,
                "effective_weight": member.effective_weight,
                "health": "ok" if member.healthy else (
                    "agent reports failure" if not member.agent_healthy else "checks failing"),
                "packets": forwarded.get(member.name, 0),
                "bytes": sent_bytes.get(member.name, 0),
                "last_heartbeat": None if member.static or member.last_heartbeat is None
                else round(now - member.last_heartbeat, 1),
                "static": member.static,
            })
        counters.setdefault("packets_in", 0)
        for name in ("forwarded", "forwarded_bytes", "dropped"):
            counters.setdefault(name, {})
        counters.setdefault("icmp_too_big", 0)
        return {"backends": rows, "counters": counters, "control": dict(self.counters),
                "conntrack": conntrack if conntrack is not None else "off",
                "dataplane": {**dataplane, "table_version": self.table.version,
                              "rebuilds": self.rebuilds, "admitting": self._admitting},
                "fastpath": fastpath, "announcements": self.announcements.status(),
                "refusals": self.refusals.status(now)}
