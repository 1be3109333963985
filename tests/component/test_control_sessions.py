"""The control channel over real loopback TCP, with a balancer on in-memory fakes: bad
registrations are refused, good ones proven and activated, losses and departures told apart."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from caplance import control_codec as codec
from caplance.balancer import Balancer
from caplance.config import BalancerConfig, Secret, VipConfig
from caplance.framed import FramedStream
from caplance.control.membership import State
from caplance.testing import MemoryListener, RecordingTransport

SECRET = b"a test secret, 32 bytes of it..."
VIP = ipaddress.ip_address("10.99.0.1")


@attrs.define
class Rig:
    balancer: Balancer
    transport: RecordingTransport
    port: int
    streams: list[trio.SocketStream] = attrs.field(factory=list)

    async def connect(self) -> FramedStream:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        self.streams.append(stream)  # closed by the fixture
        return FramedStream(stream)

    async def handshake(self, framed: FramedStream, **fields: Any) -> dict[str, Any]:
        """hello/challenge/register with a valid proof over ``fields``; the answer."""
        name = fields.get("name", "a")
        nonce_a = codec.new_nonce()
        await framed.send(codec.message("hello", name=name, nonce=nonce_a))
        challenge = await framed.expect("challenge")
        assert codec.verify_mac(SECRET, challenge["proof"], "balancer", nonce_a, challenge["nonce"], name)
        register = codec.message("register", **{
            "name": name, "data_address": "10.0.0.1", "transport": {"name": "udp", "options": {}},
            "vips": [str(VIP)], "weight": 1, "proof": "", **fields})
        register["proof"] = codec.mac(SECRET, "agent", challenge["nonce"], nonce_a,
                                      *codec.registration_fields(register))
        await framed.send(register)
        framed.seal(codec.session_key(SECRET, nonce_a, challenge["nonce"]), "agent", early_refusal=True)
        return await framed.receive()

    async def register(self, name: str = "a", **fields: Any) -> FramedStream:
        """A full registration: echo the probe the balancer sent through the transport."""
        framed = await self.connect()
        already = len(self.transport.sent)
        answer = await self.handshake(framed, name=name, **fields)
        assert answer["type"] == "welcome", answer
        while len(self.transport.sent) == already:
            await trio.sleep(0.01)
        _, probe = self.transport.sent[-1]
        token = probe[28 + len(codec.PROBE_MAGIC):].decode()
        await framed.send(codec.message("proof", token=token))
        assert (await framed.expect("active"))["type"] == "active"
        return framed


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = BalancerConfig(vips=(VipConfig(address=VIP),), control=f"127.0.0.1:{port}",
                            secret=Secret(SECRET), heartbeat_timeout=1.0,
                            control_socket=str(tmp_path / "ctl.sock"))
    transport = RecordingTransport()
    balancer = Balancer(config, listener=MemoryListener(), transports={"udp": transport})
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(balancer.run)
            made = Rig(balancer, transport, port)
            yield made
            for stream in made.streams:
                await stream.aclose()
            balancer.stop()


@pytest.mark.parametrize(("fields", "problem"), [
    ({"name": ""}, "expected a name"),
    ({"weight": 10**9}, "expected an int from 0 to 65535"),
    ({"weight": -1}, "expected an int from 0 to 65535"),
    ({"vips": []}, "at least one"),
    ({"vips": [str(VIP), str(VIP)]}, "each VIP once"),
    ({"vips": ["10.99.0.2"]}, "not a VIP of this balancer"),
    ({"data_address": "127.0.0.1"}, "cannot receive"),
    ({"data_address": str(VIP)}, "may not be a VIP"),
    ({"transport": {"name": "carrier-pigeon"}}, "not registered"),
    ({"transport": {"name": "gue", "options": {"port": "x"}}}, "port must be an int"),
])
async def test_bad_registrations_are_refused_before_anything_changes(
        rig: Rig, fields: dict[str, Any], problem: str) -> None:
    framed = await rig.connect()
    answer = await rig.handshake(framed, **fields)
    assert answer["type"] == "refused" and problem in answer["reason"], answer
    assert rig.balancer.control.membership.members() == []
    assert rig.balancer.control.counters["refused_malformed"] == 1


async def test_huge_numbers_and_odd_proofs_close_only_that_connection(rig: Rig) -> None:
    framed = await rig.connect()
    body = b'{"v":1,"type":"heartbeat","seq":' + b"9" * 5000 + b',"healthy":true}'
    await framed.stream.send_all(len(body).to_bytes(4, "big") + body)
    assert await framed.stream.receive_some(100) == b""  # hung up on
    framed = await rig.connect()
    nonce = codec.new_nonce()
    await framed.send(codec.message("hello", name="a", nonce=nonce))
    await framed.expect("challenge")
    await framed.send(codec.message("register", name="a", data_address="10.0.0.1", weight=1,
                                    transport={"name": "udp"}, vips=[str(VIP)], proof="\u00e9" * 64))
    assert (await framed.receive())["reason"] == "authentication failed"
    assert rig.balancer.control.counters["protocol_bad_json"] == 1
    assert "internal_error" not in rig.balancer.control.counters
    await rig.register("b")  # the balancer still serves


async def test_a_lost_agent_is_hung_up_on_and_an_operator_removal_is_final(rig: Rig) -> None:
    lost = await rig.register("lost")
    # no heartbeats from "lost": after the timeout the balancer closes the session, without
    # telling it it is gone for good (it may come back)
    with trio.fail_after(5):
        while rig.balancer.control.membership.get("lost").state is not State.GONE:
            await trio.sleep(0.05)
        with pytest.raises(trio.BrokenResourceError):
            while True:
                assert (await lost.receive())["type"] == "heartbeat"
    sent_away = await rig.register("sent-away")
    rig.balancer.control.set_state("sent-away", State.GONE, "test", by_operator=True)
    with trio.fail_after(5):
        while (msg := await sent_away.receive())["type"] == "heartbeat":
            pass
    assert msg == codec.message("state", state="gone")


async def test_a_replaced_registration_cannot_touch_its_successor(rig: Rig) -> None:
    old = await rig.register("a")
    new = await rig.register("a")
    successor = rig.balancer.control.membership.get("a")
    assert successor.state is State.ACTIVE
    await old.send(codec.message("state", state="paused"))  # from the replaced session
    await new.send(codec.message("heartbeat", seq=1, healthy=True))
    with trio.fail_after(5):
        assert (await new.expect("heartbeat"))["seq"] == 1
    assert rig.balancer.control.membership.get("a") is successor
    assert successor.state is State.ACTIVE  # the old session's request did nothing
    assert "a" in rig.balancer.control.sessions


def states_of(rig: Rig, name: str) -> list[State]:
    """The states ``name`` moves to from now on (filled in as it happens)."""
    seen: list[State] = []
    rig.balancer.control.membership.subscribe(
        lambda change: seen.append(change.new) if change.name == name and change.new is not change.old else None)
    return seen


async def test_a_held_name_is_refused_from_elsewhere_until_released(rig: Rig) -> None:
    control = rig.balancer.control
    real = await rig.register("a")
    member = control.membership.get("a")
    states = states_of(rig, "a")
    impostor = await rig.connect()  # same secret, another data address: another host's agent
    answer = await rig.handshake(impostor, name="a", data_address="10.0.0.3")
    assert answer["type"] == "refused" and "a is held by an agent at 127.0.0.1 (data 10.0.0.1, udp)" in answer["reason"]
    assert control.membership.get("a") is member and member.state is State.ACTIVE and states == []
    assert control.counters["refused_name_held"] == 1
    status = control.status()
    assert status["refusals"]["total"] == {"name_held": 1}
    assert [(r["address"], r["reason"], r["count"]) for r in status["refusals"]["recent"]] == [
        ("127.0.0.1", "name_held", 1)]
    assert [(row["backend"], row["address"], row["registered_from"]) for row in status["backends"]] == [
        ("a", "10.0.0.1", "127.0.0.1")]
    await real.send(codec.message("heartbeat", seq=1, healthy=True))  # the real one is untouched
    with trio.fail_after(5):
        assert (await real.expect("heartbeat"))["seq"] == 1
    again = await rig.register("a")  # the holder itself may come back as often as it likes
    assert control.membership.get("a").state is State.ACTIVE
    assert "released (was held by 127.0.0.1 (data 10.0.0.1, udp))" in control.release("a")
    await rig.register("a", data_address="10.0.0.3")  # released: the next agent takes it
    assert str(control.membership.get("a").address) == "10.0.0.3"
    await again.aclose()


async def test_an_agent_that_leaves_frees_its_name(rig: Rig) -> None:
    framed = await rig.register("a")
    await framed.send(codec.message("deregister"))
    with trio.fail_after(5):
        while "a" in rig.balancer.control.names:
            await trio.sleep(0.02)
    await rig.register("a", data_address="10.0.0.3")
    assert rig.balancer.control.membership.get("a").state is State.ACTIVE


@pytest.mark.parametrize("attack", ["unsealed", "forged", "replayed", "out_of_order", "truncated"])
async def test_a_frame_with_a_bad_seal_closes_the_session_and_is_counted(rig: Rig, attack: str) -> None:
    """As a hostile party on the path would: inject, forge, replay, reorder or cut frames."""
    framed = await rig.register("a")
    seal = framed.sealing
    assert seal is not None
    states = states_of(rig, "a")
    pause = codec.message("state", state="paused")
    heartbeat = codec.message("heartbeat", seq=1, healthy=True)
    if attack == "unsealed":
        frames = [codec.encode(pause)]
    elif attack == "forged":
        frames = [codec.encode({**seal.seal(pause), "mac": "0" * 64})]
    elif attack == "replayed":
        frames = [codec.encode(seal.seal(heartbeat))] * 2
    elif attack == "out_of_order":
        first, second = codec.encode(seal.seal(heartbeat)), codec.encode(seal.seal(pause))
        frames = [second, first]
    else:
        frames = [codec.encode(seal.seal(pause))[:-3]]
    for frame in frames:
        await framed.stream.send_all(frame)
    if attack == "truncated":
        await framed.stream.send_eof()  # type: ignore[attr-defined]
    with trio.fail_after(5):
        while rig.balancer.control.membership.get("a").state is not State.GONE:
            await trio.sleep(0.02)
    assert rig.balancer.control.counters["protocol_" + attack] == 1
    assert states == [State.GONE]  # never paused
