"""The control channel's trio glue: the balancer serving agents, and the agent's client.

The protocol itself (framing, messages, HMAC proofs) is the pure
:mod:`caplance.control_codec`; this module moves its frames over TCP with timeouts, so a
hostile or stalled peer costs one connection and nothing else.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from caplance import control_codec as codec
from caplance.config import PluginConfig, check_name, check_weight, to_ip
from caplance.errors import CaplanceError
from caplance.membership import Member, MembershipError, State
from caplance.netops import IPAddress, NetOps
from caplance.sockets import open_listeners
from caplance.packet import flow_key

if TYPE_CHECKING:
    from caplance.agent import Agent
    from caplance.balancer import Balancer

__all__ = ["FramedStream", "serve_agents", "run_agent_control", "Refused", "session_error"]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0  # seconds for hello + register: slow or silent peers are cut off
PROBE_RESEND = 0.25  # seconds between data-path probes while waiting for the echo
_LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Refused(CaplanceError):
    """The other side refused us (or failed to prove the secret)."""


class FramedStream:
    """Length-prefixed JSON messages over a trio stream."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int = codec.MAX_FRAME) -> None:
        self.stream = stream
        self._max_frame = max_frame
        self._decoder = codec.FrameDecoder(max_frame)
        self._ready: list[dict[str, Any]] = []

    async def send(self, msg: dict[str, Any]) -> None:
        await self.stream.send_all(codec.encode(msg, self._max_frame))

    async def receive(self) -> dict[str, Any]:
        """The next message. Raises :class:`codec.ProtocolError` on bad input and
        ``trio.BrokenResourceError`` when the peer closes."""
        while not self._ready:
            data = await self.stream.receive_some(65536)
            if not data:
                raise trio.BrokenResourceError("connection closed by peer")
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)

    async def expect(self, kind: str) -> dict[str, Any]:
        """The next message, which must be of type ``kind`` (``refused`` raises :class:`Refused`)."""
        msg = await self.receive()
        if msg["type"] == "refused" and kind != "refused":
            raise Refused(msg["reason"])
        if msg["type"] != kind:
            raise codec.ProtocolError("unexpected_message", f"wanted {kind}, got {msg['type']}")
        return msg

    async def aclose(self) -> None:
        await self.stream.aclose()


def session_error(raised: BaseException) -> Exception:
    """The one error that ended a session, out of any exception groups around it.

    Re-raises ``raised`` if it holds anything that is not an ``Exception`` (cancellation,
    KeyboardInterrupt): those must keep propagating. A session's boundary handles what this
    returns, so no peer can take the server down with it.
    """
    leaves: list[BaseException] = []
    pending = [raised]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        else:
            leaves.append(current)
    if not all(isinstance(leaf, Exception) for leaf in leaves):
        raise raised
    return leaves[0]  # type: ignore[return-value]


# -- the balancer's side -------------------------------------------------------------------


async def serve_agents(balancer: Balancer, netops: NetOps, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept agents on the configured control address until cancelled."""
    endpoint = balancer.config.control
    assert endpoint is not None
    listeners = await open_listeners(endpoint, "control channel")
    log.info("control channel listening", extra={"address": str(endpoint)})
    task_status.started()
    await trio.serve_listeners(functools.partial(_balancer_session, balancer), listeners)


async def _refuse(framed: FramedStream, balancer: Balancer, reason: str, counter: str) -> None:
    balancer.stats.control["refused_" + counter] += 1
    log.warning("registration refused", extra={"reason": reason})
    with trio.move_on_after(1):
        try:
            await framed.send(codec.message("refused", reason=reason))
        except _LOST:
            pass


def _peer_allowed(balancer: Balancer, peer: str) -> bool:
    networks = balancer.config.allowed_networks
    if not networks:
        return True
    address = ipaddress.ip_address(peer.split("%")[0])
    return any(address in network for network in networks)


async def _balancer_session(balancer: Balancer, stream: trio.SocketStream) -> None:
    framed = FramedStream(stream)
    member: Member | None = None
    session: _Outbox | None = None
    counters = balancer.stats.control
    handshaking = True
    try:
        async with stream:
            peer = stream.socket.getpeername()[0]
            if not _peer_allowed(balancer, peer):
                await _refuse(framed, balancer, f"{peer} is not in the allowed networks", "network")
                return
            secret = balancer.config.secret
            if secret is None:
                await _refuse(framed, balancer, "the balancer has no secret configured", "no_secret")
                return
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                member = await _handshake(balancer, framed, secret.value)
            handshaking = False
            if member is None:
                return
            await _prove_data_path(balancer, framed, member)
            session = _open_session(balancer, member)
            await framed.send(codec.message("active"))
            await _serve_member(balancer, framed, member, session)
    except BaseException as raised:
        exc = session_error(raised)
        if isinstance(exc, codec.ProtocolError):
            counters["protocol_" + exc.reason] += 1
            log.warning("control connection closed: bad message", extra={"error": str(exc)})
        elif isinstance(exc, trio.TooSlowError):
            counters["timeout"] += 1
            log.warning("control connection closed: too slow")
        elif isinstance(exc, Refused):
            log.warning("control connection closed", extra={"reason": str(exc)})
        elif isinstance(exc, _LOST):
            # An agent that hangs up mid-handshake found our proof wrong: a secret mismatch.
            counters["handshake_abandoned" if handshaking else "connection_lost"] += 1
        else:
            counters["internal_error"] += 1
            log.error("control session failed", exc_info=exc)
    finally:
        if session is not None and member is not None and balancer.sessions.get(member.name) is session[0]:
            del balancer.sessions[member.name]
        if member is not None and _current(balancer, member) and member.state is not State.GONE:
            balancer.set_state(member.name, State.GONE, "control connection lost")


def _current(balancer: Balancer, member: Member) -> bool:
    """Whether ``member`` is still the one registered under its name (a re-registration
    replaces it; the old session must then leave the new member alone)."""
    return member.name in balancer.membership and balancer.membership.get(member.name) is member


async def _handshake(balancer: Balancer, framed: FramedStream, secret: bytes) -> Member | None:
    """hello -> challenge -> register; returns the new member, or None after refusing."""
    hello = await framed.expect("hello")
    name, nonce_a = hello["name"], hello["nonce"]
    nonce_b = codec.new_nonce()
    await framed.send(codec.message("challenge", nonce=nonce_b,
                                    proof=codec.mac(secret, "balancer", nonce_a, nonce_b, name)))
    register = await framed.expect("register")
    if register["name"] != name:
        await _refuse(framed, balancer, "name differs from hello", "malformed")
        return None
    if not codec.verify_mac(secret, register["proof"], "agent", nonce_b, nonce_a,
                            *codec.registration_fields(register)):
        await _refuse(framed, balancer, "authentication failed", "auth")
        return None
    try:
        address, vips, transport = _check_registration(balancer, register)
    except (CaplanceError, ValueError, TypeError, AttributeError) as exc:
        await _refuse(framed, balancer, f"bad registration: {exc}", "malformed")
        return None
    if name in balancer.membership and balancer.membership.get(name).static:
        await _refuse(framed, balancer, f"{name} is a static backend in the config", "name_taken")
        return None
    member = Member(name=name, address=address, transport=transport, vips=vips,
                    weight=register["weight"], static=False)
    balancer.add_member(member)
    balancer.stats.control["registrations"] += 1
    return member


def _check_registration(balancer: Balancer, register: dict[str, Any]) -> tuple[IPAddress, tuple[IPAddress, ...], PluginConfig]:
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
        balancer.vip_config(vip)  # a VIP of this balancer
    spec = register["transport"]
    transport = PluginConfig(name=spec.get("name", ""), options=spec.get("options", {}))
    balancer.transport(transport)  # refuses unknown transports and bad options
    return address, vips, transport


async def _prove_data_path(balancer: Balancer, framed: FramedStream, member: Member) -> None:
    """Send a random token through the real transport; the agent must echo it in time."""
    token = secrets.token_hex(16)
    probe = codec.probe_packet(member.vips[0], token)
    sender = balancer.sender(member.transport, member.address)
    await framed.send(codec.message("welcome"))
    try:
        with trio.fail_after(balancer.config.proof_timeout):
            async with trio.open_nursery() as nursery:
                async def resend() -> None:
                    while True:
                        try:
                            sender.send(probe, flow_key(probe))
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
        if _current(balancer, member):
            balancer.set_state(member.name, State.GONE, "data path proof failed")
        await _refuse(framed, balancer, "data path proof failed: no probe echoed in time", "proof")
        raise Refused("data path proof failed") from None
    if not _current(balancer, member):
        raise Refused("replaced by a newer registration")
    balancer.set_state(member.name, State.ACTIVE, "data path proven")


_Outbox = tuple[Callable[[dict[str, Any] | None], None], trio.MemoryReceiveChannel[dict[str, Any] | None]]


def _open_session(balancer: Balancer, member: Member) -> _Outbox:
    """Register the session's outbox, so that state changes from now on (an operator's
    pause or deregister, say, even before the agent has heard ``active``) reach the agent."""
    outbox_send, outbox = trio.open_memory_channel[dict[str, Any] | None](16)

    def notify(msg: dict[str, Any] | None) -> None:
        try:
            outbox_send.send_nowait(msg)
        except trio.WouldBlock:
            log.warning("agent not reading its control channel", extra={"backend": member.name})

    balancer.sessions[member.name] = notify
    return notify, outbox


async def _serve_member(balancer: Balancer, framed: FramedStream, member: Member, session: _Outbox) -> None:
    """Heartbeats (echoed, so the agent knows we live) and state requests until the agent
    leaves, the connection ends, or the balancer closes the session."""
    notify, outbox = session
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
            with trio.fail_after(balancer.config.heartbeat_timeout * 2):
                msg = await framed.receive()
            if not _current(balancer, member):
                raise Refused("replaced by a newer registration")
            kind = msg["type"]
            if kind == "heartbeat":
                balancer.heartbeat(member.name, msg["healthy"])
                notify(codec.message("heartbeat", seq=msg["seq"], healthy=True))
            elif kind == "state":
                wanted = {"active": State.ACTIVE, "paused": State.PAUSED, "draining": State.DRAINING}
                if msg["state"] not in wanted:
                    raise codec.ProtocolError("bad_state", msg["state"][:20])
                try:
                    balancer.set_state(member.name, wanted[msg["state"]], "requested by the agent")
                except MembershipError as exc:
                    log.warning("agent state request refused", extra={"error": str(exc)})
            elif kind == "deregister":
                balancer.set_state(member.name, State.GONE, "deregistered by the agent")
                nursery.cancel_scope.cancel()
                return
            else:
                raise codec.ProtocolError("unexpected_message", kind)


# -- the agent's side ----------------------------------------------------------------------


async def run_agent_control(agent: Agent, probes: trio.MemoryReceiveChannel[str]) -> None:
    """Register with the balancer and keep registered: reconnect with backoff (jittered,
    doubling up to 10 s) whenever the connection ends, until the balancer says we are gone
    or the agent stops."""
    endpoint = agent.config.balancer
    assert endpoint is not None
    backoff = 0.2

    def registered() -> None:
        nonlocal backoff
        backoff = 0.2

    while not agent.left:
        try:
            stream = await trio.open_tcp_stream(str(endpoint.host), endpoint.port)
            async with stream:
                await _register_and_serve(agent, FramedStream(stream), probes, registered)
        except BaseException as raised:
            exc = session_error(raised)
            if isinstance(exc, Refused):
                log.warning("balancer refused the registration", extra={"reason": str(exc)})
            elif isinstance(exc, codec.ProtocolError):
                log.warning("bad message from the balancer", extra={"error": str(exc)})
            elif isinstance(exc, trio.TooSlowError):
                log.warning("balancer too slow; reconnecting")
            elif isinstance(exc, _LOST):
                log.info("control connection lost; reconnecting", extra={"error": str(exc)})
            else:
                log.error("control session failed; reconnecting", exc_info=exc)
        if agent.left:
            return
        await trio.sleep(backoff * random.uniform(0.5, 1.5))
        backoff = min(backoff * 2, 10.0)


async def _register_and_serve(agent: Agent, framed: FramedStream, probes: trio.MemoryReceiveChannel[str],
                              registered: Callable[[], None]) -> None:
    config = agent.config
    secret = config.secret
    if secret is None:
        raise Refused("no secret configured (secret_file or CAPLANCE_SECRET)")
    nonce_a = codec.new_nonce()
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        await framed.send(codec.message("hello", name=config.name, nonce=nonce_a))
        challenge = await framed.expect("challenge")
        if not codec.verify_mac(secret.value, challenge["proof"], "balancer", nonce_a, challenge["nonce"], config.name):
            raise Refused("the balancer failed to prove it knows the secret")
        data_address = config.data_address
        if data_address.is_unspecified:
            data_address = to_ip(framed.stream.socket.getsockname()[0])  # type: ignore[attr-defined]
        register = codec.message(
            "register", name=config.name, data_address=str(data_address),
            transport={"name": config.transport.name, "options": dict(config.transport.options)},
            vips=[str(vip) for vip in config.vips], weight=config.weight, proof="",
        )
        register["proof"] = codec.mac(secret.value, "agent", challenge["nonce"], nonce_a,
                                      *codec.registration_fields(register))
        await framed.send(register)
        await framed.expect("welcome")
    while True:  # drop tokens of earlier attempts
        try:
            probes.receive_nowait()
        except trio.WouldBlock:
            break
    with trio.fail_after(HANDSHAKE_TIMEOUT + 5):
        async with trio.open_nursery() as nursery:
            async def echo() -> None:
                async for token in probes:
                    await framed.send(codec.message("proof", token=token))

            nursery.start_soon(echo)
            await framed.expect("active")
            nursery.cancel_scope.cancel()
    log.info("registered with the balancer", extra={"agent": config.name, "balancer": str(config.balancer)})
    registered()
    await _agent_registered(agent, framed)


async def _agent_registered(agent: Agent, framed: FramedStream) -> None:
    """Heartbeats out, state changes in; the agent's own requests (drain, leave) out."""
    async with trio.open_nursery() as nursery:
        async def heartbeats() -> None:
            seq = 0
            while True:
                seq += 1
                await framed.send(codec.message("heartbeat", seq=seq, healthy=agent.healthy))
                await trio.sleep(agent.config.heartbeat_interval)

        async def requests() -> None:
            async for request in agent.requests():
                if request == "deregister":
                    await framed.send(codec.message("deregister"))
                    agent.mark_left()
                    nursery.cancel_scope.cancel()
                    return
                await framed.send(codec.message("state", state=request))

        nursery.start_soon(heartbeats)
        nursery.start_soon(requests)
        silence = max(3 * agent.config.heartbeat_interval, HANDSHAKE_TIMEOUT)
        while True:
            with trio.fail_after(silence):  # the balancer echoes every heartbeat
                msg = await framed.receive()
            if msg["type"] == "state":
                agent.balancer_state = msg["state"]
                log.info("balancer changed our state", extra={"agent": agent.config.name, "state": msg["state"]})
                if msg["state"] == State.GONE.value:
                    agent.mark_left()
                    nursery.cancel_scope.cancel()
                    return
            elif msg["type"] == "refused":
                raise Refused(msg["reason"])

