"""Agent sessions, the balancer's side: registration, the data-path proof, heartbeats and
state changes, one TCP connection per agent (see :mod:`caplance.control_codec` for the
protocol).

It depends on an :class:`AgentRegistry` -- the few things a session asks of the control
plane -- not on the control plane itself.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import logging
import secrets
from collections.abc import Callable
from typing import Any, Protocol

import trio

from caplance import control_codec as codec
from caplance.config import BalancerConfig, PluginConfig, VipConfig, check_name, check_weight, to_ip
from caplance.control.identity import Holder, NameBindings, Refusals
from caplance.control.membership import Member, Membership, MembershipError, State
from caplance.errors import CaplanceError
from caplance.framed import LOST, FramedStream, Refused, session_error
from caplance.interfaces import Transport
from caplance.netops import IPAddress, NetOps
from caplance.packet import flow_key
from caplance.sockets import open_listeners

__all__ = ["AgentRegistry", "Notify", "serve_agents"]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0  # seconds for hello + register: slow or silent peers are cut off
PROBE_RESEND = 0.25  # seconds between data-path probes while waiting for the echo

#: pushes a message to one agent's session (None: hang up)
Notify = Callable[[dict[str, Any] | None], None]


class AgentRegistry(Protocol):
    """What an agent session needs of the control plane."""

    config: BalancerConfig
    membership: Membership
    #: control-plane event counters (refusals, timeouts, registrations)
    counters: collections.Counter[str]
    #: registered agents' sessions, by backend name
    sessions: dict[str, Notify]
    #: which name is held from where
    names: NameBindings
    #: refused and failed registrations, by source address and reason
    refusals: Refusals

    def vip_config(self, address: IPAddress) -> VipConfig: ...

    def transport(self, spec: PluginConfig) -> Transport: ...

    def add_member(self, member: Member) -> None: ...

    def set_state(self, name: str, state: State, reason: str) -> None: ...

    def heartbeat(self, name: str, healthy: bool) -> None: ...


async def serve_agents(registry: AgentRegistry, netops: NetOps, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept agents on the configured control address until cancelled."""
    endpoint = registry.config.control
    assert endpoint is not None
    listeners = await open_listeners(endpoint, "control channel")
    log.info("control channel listening", extra={"address": str(endpoint)})
    task_status.started()
    await trio.serve_listeners(functools.partial(_session, registry), listeners)


def _note_refusal(registry: AgentRegistry, peer: str, reason: str, detail: str) -> None:
    """Count a refused or failed registration; log it with its source (rate-limited)."""
    if registry.refusals.note(peer, reason, trio.current_time()):
        log.warning("registration refused", extra={
            "peer": peer, "reason": reason, "detail": detail,
            "count": registry.refusals.count(peer, reason)})


async def _refuse(framed: FramedStream, registry: AgentRegistry, reason: str, counter: str, peer: str) -> None:
    registry.counters["refused_" + counter] += 1
    _note_refusal(registry, peer, counter, reason)
    with trio.move_on_after(1):
        try:
            await framed.send(codec.message("refused", reason=reason))
        except LOST:
            pass


def _peer_allowed(registry: AgentRegistry, peer: str) -> bool:
    networks = registry.config.allowed_networks
    if not networks:
        return True
    address = ipaddress.ip_address(peer.split("%")[0])
    return any(address in network for network in networks)


async def _session(registry: AgentRegistry, stream: trio.SocketStream) -> None:
    framed = FramedStream(stream)
    member: Member | None = None
    notify: Notify | None = None
    counters = registry.counters
    handshaking = True
    peer = "?"
    try:
        async with stream:
            peer = stream.socket.getpeername()[0]
            if not _peer_allowed(registry, peer):
                await _refuse(framed, registry, f"{peer} is not in the allowed networks", "network", peer)
                return
            secret = registry.config.secret
            if secret is None:
                await _refuse(framed, registry, "the balancer has no secret configured", "no_secret", peer)
                return
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                registered = await _handshake(registry, framed, secret.value, peer)
            handshaking = False
            if registered is None:
                return
            member, holder = registered
            await _prove_data_path(registry, framed, member, holder)
            notify, outbox = _open_session(registry, member)
            await framed.send(codec.message("active"))
            await _serve_member(registry, framed, member, notify, outbox)
    except BaseException as raised:
        exc = session_error(raised)
        if isinstance(exc, codec.ProtocolError):
            counters["protocol_" + exc.reason] += 1
            log.warning("control connection closed: bad message", extra={"peer": peer, "error": str(exc)})
            if handshaking:
                _note_refusal(registry, peer, "protocol_" + exc.reason, str(exc))
        elif isinstance(exc, trio.TooSlowError):
            counters["timeout"] += 1
            log.warning("control connection closed: too slow", extra={"peer": peer})
            if handshaking:
                _note_refusal(registry, peer, "handshake_timeout", "no registration in time")
        elif isinstance(exc, Refused):
            log.warning("control connection closed", extra={"peer": peer, "reason": str(exc)})
        elif isinstance(exc, LOST):
            # An agent that hangs up mid-handshake found our proof wrong: a secret mismatch.
            counters["handshake_abandoned" if handshaking else "connection_lost"] += 1
            if handshaking:
                _note_refusal(registry, peer, "handshake_abandoned",
                              "hung up during the handshake (a wrong secret, most likely)")
        else:
            counters["internal_error"] += 1
            log.error("control session failed", exc_info=exc)
    finally:
        if notify is not None and member is not None and registry.sessions.get(member.name) is notify:
            del registry.sessions[member.name]
        if member is not None and _current(registry, member) and member.state is not State.GONE:
            registry.set_state(member.name, State.GONE, "control connection lost")


def _current(registry: AgentRegistry, member: Member) -> bool:
    """Whether ``member`` is still the one registered under its name (a re-registration
    replaces it; the old session must then leave the new member alone)."""
    return member.name in registry.membership and registry.membership.get(member.name) is member


async def _handshake(registry: AgentRegistry, framed: FramedStream, secret: bytes,
                     peer: str) -> tuple[Member, Holder] | None:
    """hello -> challenge -> register; returns the new member and where it registers from,
    or None after refusing. Seals the session once the agent's proof checks out."""
    hello = await framed.expect("hello")
    name, nonce_a = hello["name"], hello["nonce"]
    nonce_b = codec.new_nonce()
    await framed.send(codec.message("challenge", nonce=nonce_b,
                                    proof=codec.mac(secret, "balancer", nonce_a, nonce_b, name)))
    register = await framed.expect("register")
    if register["name"] != name:
        await _refuse(framed, registry, "name differs from hello", "malformed", peer)
        return None
    if not codec.verify_mac(secret, register["proof"], "agent", nonce_b, nonce_a,
                            *codec.registration_fields(register)):
        await _refuse(framed, registry, "authentication failed", "auth", peer)
        return None
    framed.seal(codec.session_key(secret, nonce_a, nonce_b), "balancer")
    try:
        address, vips, transport = _check_registration(registry, register)
        decap = register.get("decap", "agent")
        if decap not in ("agent", "kernel"):
            raise ValueError(f"decap must be agent or kernel, got {str(decap)[:20]!r}")
    except (CaplanceError, ValueError, TypeError, AttributeError) as exc:
        await _refuse(framed, registry, f"bad registration: {exc}", "malformed", peer)
        return None
    if name in registry.membership and registry.membership.get(name).static:
        await _refuse(framed, registry, f"{name} is a static backend in the config", "name_taken", peer)
        return None
    holder = Holder(peer=peer, data_address=address, transport=transport)
    held = registry.names.conflict(name, holder)
    if held is not None:
        await _refuse(framed, registry, f"{name} is held by an agent at {held.describe()}; it must leave,"
                                        f" or an operator run `caplance ctl release {name}`", "name_held", peer)
        return None
    member = Member(name=name, address=address, transport=transport, vips=vips,
                    weight=register["weight"], static=False, kernel_decap=decap == "kernel")
    registry.add_member(member)
    registry.counters["registrations"] += 1
    return member, holder


def _check_registration(registry: AgentRegistry,
                        register: dict[str, Any]) -> tuple[IPAddress, tuple[IPAddress, ...], PluginConfig]:
    """Everything a register message says, checked before anything changes. Raises
    ``ValueError``/``CaplanceError`` saying what is wrong."""
    check_name(register["name"])
    check_weight(register["weight"])
    address = to_ip(register["data_address"])
    if address.is_unspecified or address.is_loopback or address.is_multicast:
        raise ValueError(f"data address {address} cannot receive from the balancer")
    vips = tuple(to_ip(vip) for vip in register["vips"])
    if not vips or len(set(vips)) != len(vips):
        raise ValueError("vips must list each VIP once, at least one")
    if address in vips:
        raise ValueError("the data address may not be a VIP")
    for vip in vips:
        registry.vip_config(vip)  # a VIP of this balancer
    spec = register["transport"]
    transport = PluginConfig(name=spec.get("name", ""), options=spec.get("options", {}))
    registry.transport(transport)  # refuses unknown transports and bad options
    return address, vips, transport


async def _prove_data_path(registry: AgentRegistry, framed: FramedStream, member: Member,
                           holder: Holder) -> None:
    """Send a random token through the real transport (a sender of the session's own, not a
    data plane's); the agent must echo it in time. Proven, the name is bound to ``holder``."""
    token = secrets.token_hex(16)
    probe = codec.probe_packet(member.vips[0], token)
    key = flow_key(probe)
    sender = registry.transport(member.transport).open_sender(member.address)
    await framed.send(codec.message("welcome"))
    try:
        with trio.fail_after(registry.config.proof_timeout):
            async with trio.open_nursery() as nursery:
                async def resend() -> None:
                    while True:
                        try:
                            sender.send(probe, key)
                        except OSError:
                            pass  # counted as a failed proof if no probe gets through
                        await trio.sleep(PROBE_RESEND)

                nursery.start_soon(resend)
                while True:
                    msg = await framed.expect("proof")
                    if msg["token"] == token:
                        nursery.cancel_scope.cancel()
                        break
    except trio.TooSlowError:
        if _current(registry, member):
            registry.set_state(member.name, State.GONE, "data path proof failed")
        await _refuse(framed, registry, "data path proof failed: no probe echoed in time", "proof",
                      holder.peer)
        raise Refused("data path proof failed") from None
    finally:
        sender.close()
    if not _current(registry, member):
        raise Refused("replaced by a newer registration")
    registry.names.bind(member.name, holder)
    registry.set_state(member.name, State.ACTIVE, "data path proven")


def _open_session(registry: AgentRegistry,
                  member: Member) -> tuple[Notify, trio.MemoryReceiveChannel[dict[str, Any] | None]]:
    """Register the session's outbox, so that state changes from now on (an operator's
    pause or deregister, say, even before the agent has heard ``active``) reach the agent."""
    outbox_send, outbox = trio.open_memory_channel[dict[str, Any] | None](16)

    def notify(msg: dict[str, Any] | None) -> None:
        try:
            outbox_send.send_nowait(msg)
        except trio.WouldBlock:
            log.warning("agent not reading its control channel", extra={"backend": member.name})

    registry.sessions[member.name] = notify
    return notify, outbox


_WANTED = {"active": State.ACTIVE, "paused": State.PAUSED, "draining": State.DRAINING}


async def _serve_member(registry: AgentRegistry, framed: FramedStream, member: Member, notify: Notify,
                        outbox: trio.MemoryReceiveChannel[dict[str, Any] | None]) -> None:
    """Heartbeats (echoed, so the agent knows we live) and state requests until the agent
    leaves, the connection ends, or the balancer closes the session."""
    async with trio.open_nursery() as nursery:
        async def writer() -> None:
            async for msg in outbox:
                if msg is None:  # lost (not sent away): hang up, the agent comes back
                    nursery.cancel_scope.cancel()
                    return
                await framed.send(msg)
                if msg["type"] == "state" and msg["state"] == State.GONE.value:
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(writer)
        while True:
            with trio.fail_after(registry.config.heartbeat_timeout * 2):
                msg = await framed.receive()
            if not _current(registry, member):
                raise Refused("replaced by a newer registration")
            kind = msg["type"]
            if kind == "heartbeat":
                registry.heartbeat(member.name, msg["healthy"])
                notify(codec.message("heartbeat", seq=msg["seq"], healthy=True))
            elif kind == "state":
                if msg["state"] not in _WANTED:
                    raise codec.ProtocolError("bad_state", msg["state"][:20])
                try:
                    registry.set_state(member.name, _WANTED[msg["state"]], "requested by the agent")
                except MembershipError as exc:
                    log.warning("agent state request refused", extra={"error": str(exc)})
            elif kind == "deregister":
                registry.set_state(member.name, State.GONE, "deregistered by the agent")
                registry.names.release(member.name)
                nursery.cancel_scope.cancel()
                return
            else:
                raise codec.ProtocolError("unexpected_message", kind)
