"""Agent sessions, the agent's side: register with the balancer and keep registered.

The protocol is :mod:`caplance.control_codec`; this is its trio glue for the agent. It
depends on an :class:`AgentHandle` -- what a session needs of the agent -- not on the
:class:`~caplance.agent.Agent` class.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Protocol

import trio

from caplance import control_codec as codec
from caplance.config import AgentConfig, Endpoint, to_ip
from caplance.control.membership import State
from caplance.framed import LOST, FramedStream, Refused, session_error

__all__ = ["AgentHandle", "Registration", "run_agent_control"]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 5.0


class AgentHandle(Protocol):
    """What the session needs of the agent's registration with one balancer."""

    #: the state the balancer last told us
    balancer_state: str | None

    @property
    def config(self) -> AgentConfig: ...

    @property
    def healthy(self) -> bool:
        """What the local health check last said (reported in heartbeats)."""
        ...

    @property
    def kernel_decap(self) -> bool:
        """The kernel unwraps our packets."""
        ...

    @property
    def left(self) -> bool: ...

    def mark_left(self) -> None: ...

    def requests(self) -> trio.MemoryReceiveChannel[str]: ...


class _Backend(Protocol):
    config: AgentConfig
    healthy: bool
    kernel_decap: bool


class Registration:
    """The agent's registration with one balancer (an agent registers with each balancer of
    its VIPs): that balancer's view of us, its own requests and data-path probes."""

    def __init__(self, agent: _Backend, endpoint: Endpoint) -> None:
        self._agent = agent
        self.endpoint = endpoint
        self.balancer_state: str | None = None
        self._left = trio.Event()
        self._requests_send, self._requests = trio.open_memory_channel[str](8)
        self.probes_send, self.probes = trio.open_memory_channel[str](8)

    @property
    def config(self) -> AgentConfig:
        return self._agent.config

    @property
    def healthy(self) -> bool:
        return self._agent.healthy

    @property
    def kernel_decap(self) -> bool:
        return self._agent.kernel_decap

    @property
    def left(self) -> bool:
        return self._left.is_set()

    def mark_left(self) -> None:
        self._left.set()

    async def wait_left(self) -> None:
        await self._left.wait()

    def requests(self) -> trio.MemoryReceiveChannel[str]:
        return self._requests

    def request(self, state: str) -> None:
        """Ask this balancer for ``state`` ("draining") or to let us go ("deregister")."""
        try:
            self._requests_send.send_nowait(state)
        except trio.WouldBlock:
            log.warning("request not sent: the session is not reading", extra={"request": state})

    async def run(self) -> None:
        await run_agent_control(self, self.endpoint, self.probes)


async def run_agent_control(agent: AgentHandle, endpoint: Endpoint, probes: trio.MemoryReceiveChannel[str]) -> None:
    """Register with the balancer and keep registered: reconnect with backoff (jittered,
    doubling up to 10 s) whenever the connection ends, until the balancer says we are gone
    or the agent stops."""
    backoff = 0.2

    def registered() -> None:
        nonlocal backoff
        backoff = 0.2

    while not agent.left:
        try:
            stream = await trio.open_tcp_stream(str(endpoint.host), endpoint.port)
            async with stream:
                await _register_and_serve(agent, endpoint, FramedStream(stream), probes, registered)
        except BaseException as raised:
            exc = session_error(raised)
            if isinstance(exc, Refused):
                log.warning("balancer refused the registration", extra={"reason": str(exc)})
            elif isinstance(exc, codec.ProtocolError):
                log.warning("bad message from the balancer", extra={"error": str(exc)})
            elif isinstance(exc, trio.TooSlowError):
                log.warning("balancer too slow; reconnecting")
            elif isinstance(exc, LOST):
                log.info("control connection lost; reconnecting", extra={"error": str(exc)})
            else:
                log.error("control session failed; reconnecting", exc_info=exc)
        if agent.left:
            return
        await trio.sleep(backoff * random.uniform(0.5, 1.5))
        backoff = min(backoff * 2, 10.0)


async def _register_and_serve(agent: AgentHandle, endpoint: Endpoint, framed: FramedStream,
                              probes: trio.MemoryReceiveChannel[str], registered: Callable[[], None]) -> None:
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
            decap="kernel" if agent.kernel_decap else "agent",
        )
        register["proof"] = codec.mac(secret.value, "agent", challenge["nonce"], nonce_a,
                                      *codec.registration_fields(register))
        await framed.send(register)
        framed.seal(codec.session_key(secret.value, nonce_a, challenge["nonce"]), "agent", early_refusal=True)
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
    log.info("registered with the balancer", extra={"agent": config.name, "balancer": str(endpoint)})
    registered()
    await _agent_registered(agent, framed)


async def _agent_registered(agent: AgentHandle, framed: FramedStream) -> None:
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

