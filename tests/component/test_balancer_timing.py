"""The balancer's trio pieces with in-memory fakes: heartbeats, drains, health, rebuilds.

Time-based behaviour runs on trio's MockClock (``autojump_clock``): no real sleeps.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from caplance.agent import Agent
from caplance.balancer import Balancer
from caplance.config import AgentConfig, BalancerConfig, HealthCheckConfig, PluginConfig, VipConfig
from caplance.control.health import Tracker, run_health_checks
from caplance.control.plane import ControlPlane
from caplance.control.rebuild import InlineBuilder, ProcessBuilder, TableBuilder
from caplance.control.membership import Member, State
from caplance.httpio import Reply, request
from caplance.testing import MemoryListener, RecordingTransport

VIP = ipaddress.ip_address("10.99.0.1")
ADDRESSES = {name: ipaddress.ip_address(f"10.0.0.{n}") for n, name in enumerate(["a", "b", "c"], 1)}


def packet(sport: int, flags: int = 0x10) -> bytes:
    """A client -> VIP:80 TCP packet (checksums are not the balancer's business)."""
    import struct

    tcp = struct.pack("!HHIIBBHHH", sport, 80, 1, 0, 5 << 4, flags, 65535, 0, 0)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                         ipaddress.ip_address("192.0.2.9").packed, VIP.packed)
    return header + tcp


class Harness:
    def __init__(self, balancer: Balancer, listener: MemoryListener, transport: RecordingTransport) -> None:
        self.balancer = balancer
        self.listener = listener
        self.transport = transport

    @property
    def control(self) -> ControlPlane:
        return self.balancer.control

    def join(self, name: str, weight: int = 1) -> None:
        self.control.add_member(Member(name=name, address=ADDRESSES[name], transport=PluginConfig(name="udp"),
                                       vips=(VIP,), weight=weight, static=False))
        self.control.set_state(name, State.ACTIVE, "test")

    async def settle(self) -> None:
        """Let the rebuild task publish the new table."""
        while self.control.rebuild_pending:
            await trio.sleep(0.01)

    async def send(self, packets: list[bytes]) -> list[str]:
        """Push packets through; the backends (by name) they went to."""
        before = len(self.transport.sent)
        for one in packets:
            self.listener.source.push(one)
        await trio.testing.wait_all_tasks_blocked()
        names = {address: name for name, address in ADDRESSES.items()}
        return [names[address] for address, _ in self.transport.sent[before:]]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """A running balancer whose selector rebuilds run inline: with the mock clock, a wait
    for a real child process would let virtual time race ahead (expiring flows, heartbeats)."""
    async with _harness(tmp_path, InlineBuilder()) as made:
        yield made


@contextlib.asynccontextmanager
async def _harness(tmp_path: Path, builder: TableBuilder, **vip: Any) -> AsyncIterator[Harness]:
    config = BalancerConfig(vips=(VipConfig(address=VIP, ports=(80,), **vip),), heartbeat_timeout=3.0,
                            drain_timeout=5.0, drain_idle=0.5, control_socket=str(tmp_path / "ctl.sock"))
    listener, transport = MemoryListener(), RecordingTransport()
    balancer = Balancer(config, listener=listener, transports={"udp": transport}, builder=builder)
    async with trio.open_nursery() as nursery:
        await nursery.start(balancer.run)
        yield Harness(balancer, listener, transport)
        balancer.stop()


async def test_a_silent_backend_is_removed_after_the_heartbeat_timeout(
        harness: Harness, autojump_clock: trio.testing.MockClock) -> None:
    harness.join("a")
    harness.join("b")
    await harness.settle()
    assert set(await harness.send([packet(p) for p in range(1000, 1100)])) == {"a", "b"}
    start = trio.current_time()
    gone_at = None
    while trio.current_time() - start < 10:
        await trio.sleep(0.5)
        harness.control.heartbeat("a", True)  # only a keeps beating
        if gone_at is None and harness.control.membership.get("b").state is State.GONE:
            gone_at = trio.current_time() - start
    assert gone_at is not None and 3.0 <= gone_at <= 3.0 + 0.75 + 0.5  # timeout + watchdog period
    assert harness.control.membership.get("a").state is State.ACTIVE
    await harness.settle()
    assert set(await harness.send([packet(p) for p in range(1000, 1100)])) == {"a"}


async def test_a_drain_ends_at_its_deadline(harness: Harness, autojump_clock: trio.testing.MockClock) -> None:
    harness.join("a")
    harness.join("b")
    harness.control.set_state("b", State.DRAINING, "test", drain_timeout=5.0)
    start = trio.current_time()
    while harness.control.membership.get("b").state is State.DRAINING:
        await trio.sleep(0.1)
        harness.control.heartbeat("a", True)
        harness.control.heartbeat("b", True)
    assert 5.0 <= trio.current_time() - start <= 5.0 + 0.75 + 0.1
    assert harness.control.membership.get("b").state is State.GONE
    await harness.settle()
    assert set(await harness.send([packet(p) for p in range(2000, 2100)])) == {"a"}


async def test_paused_backends_get_no_new_flows(harness: Harness, autojump_clock: trio.testing.MockClock) -> None:
    harness.join("a")
    harness.join("b")
    harness.control.set_state("a", State.PAUSED, "test")
    await harness.settle()
    assert set(await harness.send([packet(p) for p in range(3000, 3100)])) == {"b"}
    harness.control.set_state("a", State.ACTIVE, "test")
    await harness.settle()
    # flows that started while a was paused stay on b; new flows use a again
    assert set(await harness.send([packet(p) for p in range(3000, 3100)])) == {"b"}
    assert set(await harness.send([packet(p) for p in range(3100, 3200)])) == {"a", "b"}


async def test_a_paused_backend_keeps_its_established_flows(
        harness: Harness, autojump_clock: trio.testing.MockClock) -> None:
    harness.join("a")
    harness.join("b")
    await harness.settle()
    before = await harness.send([packet(p) for p in range(7000, 7100)])
    harness.control.set_state("a", State.PAUSED, "test")
    await harness.settle()
    assert await harness.send([packet(p) for p in range(7000, 7100)]) == before  # unmoved
    assert set(await harness.send([packet(p) for p in range(7100, 7200)])) == {"b"}  # new flows


def test_rise_and_fall_hysteresis() -> None:
    tracker = Tracker(rise=2, fall=3)
    results = [False, False, True, False, False, False, True, True]
    flips = [tracker.record(r) for r in results]
    assert flips == [None, None, None, None, None, False, None, True]


async def test_active_checks_flip_health_after_fall_and_rise(
        harness: Harness, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    harness.join("a")
    answers = iter([True, False, False, False, True, True] + [True] * 100)
    seen: list[tuple[float, bool]] = []

    async def fake_check(address: object, config: object) -> bool:
        return next(answers)

    def record(name: str, healthy: bool) -> None:
        seen.append((trio.current_time(), healthy))
        ControlPlane.set_check_health(harness.control, name, healthy)

    monkeypatch.setattr("caplance.control.health.check_once", fake_check)
    monkeypatch.setattr(harness.control, "set_check_health", record)
    config = HealthCheckConfig(port=80, interval=2.0, timeout=1.0, rise=2, fall=3)
    async def keep_beating() -> None:
        while True:
            harness.control.heartbeat("a", True)
            await trio.sleep(0.5)

    start = trio.current_time()
    with trio.move_on_after(13):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_beating)
            nursery.start_soon(run_health_checks, harness.control, VIP, config)
    times = [(round(at - start), healthy) for at, healthy in seen]
    assert times == [(6, False), (10, True)]  # 3rd failure at t=6 s, 2nd pass at t=10 s


BIG_TABLE = {"selector": PluginConfig(name="maglev", options={"table_size": 1000003})}


async def forwarded_during_a_rebuild(harness: Harness) -> int:
    """Packets forwarded while a large maglev table (a million slots: pure Python, holding
    its process's GIL for a good part of a second) is built for a new backend."""
    harness.join("a")
    await harness.settle()
    rebuilds = harness.control.rebuilds
    harness.join("b")
    forwarded = 0
    while harness.control.rebuilds == rebuilds:
        forwarded += len(await harness.send([packet(p) for p in range(4000, 4010)]))
        await trio.sleep(0.001)
    assert set(await harness.send([packet(p) for p in range(4000, 4100)])) == {"a", "b"}
    return forwarded


async def test_rebuilds_in_a_child_process_do_not_stall_forwarding(tmp_path: Path) -> None:
    async with _harness(tmp_path, ProcessBuilder(), **BIG_TABLE) as harness:
        assert await forwarded_during_a_rebuild(harness) >= 100  # packets kept flowing


async def test_the_stall_check_can_fail(tmp_path: Path) -> None:
    """The same build in the balancer's own thread: nothing is forwarded until it is done
    (but the one batch sent before the build began)."""
    async with _harness(tmp_path, InlineBuilder(), **BIG_TABLE) as harness:
        assert await forwarded_during_a_rebuild(harness) <= 10


async def test_malformed_packets_are_counted_and_forwarding_continues(harness: Harness) -> None:
    harness.join("a")
    await harness.settle()
    sent = await harness.send([b"", b"\x45\x00", b"\x60" + b"\x00" * 10, packet(5000), b"\xff" * 60])
    assert sent == ["a"]
    dropped = harness.balancer.snapshot()["dropped"]
    assert dropped["malformed_truncated"] == 3 and dropped["malformed_bad_version"] == 1


async def test_stopping_drains_refuses_new_flows_and_detaches(tmp_path: Path) -> None:
    config = BalancerConfig(vips=(VipConfig(address=VIP, ports=(80,)),), drain_timeout=5.0, drain_idle=0.3,
                            control_socket=str(tmp_path / "ctl.sock"))
    listener, transport = MemoryListener(), RecordingTransport()
    balancer = Balancer(config, listener=listener, transports={"udp": transport})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(balancer.run)
            balancer.control.add_member(Member(name="a", address=ADDRESSES["a"], transport=PluginConfig(name="udp"),
                                               vips=(VIP,), weight=1, static=False))
            balancer.control.set_state("a", State.ACTIVE, "test")
            await trio.sleep(0.1)
            listener.source.push(packet(6001, flags=0x02))  # flow 6001 starts before the stop
            listener.source.push(packet(6001, flags=0x10))
            await trio.testing.wait_all_tasks_blocked()
            balancer.stop()
            await trio.sleep(0.05)
            listener.source.push(packet(6000, flags=0x02))  # a SYN: a new flow
            listener.source.push(packet(6001, flags=0x10))  # an ACK of an existing one
            await trio.testing.wait_all_tasks_blocked()
    assert balancer.snapshot()["dropped"]["draining"] == 1
    assert len(transport.sent) == 3  # flow 6001's three packets; not the new flow's SYN
    assert not (tmp_path / "ctl.sock").exists()  # the ctl socket went with it


async def test_agent_sigterm_asks_to_drain_then_deregisters(autojump_clock: trio.testing.MockClock) -> None:
    agent = Agent(AgentConfig(name="a", vips=(VIP,), balancer="127.0.0.1:7000", drain_timeout=4.0))
    requests = agent.requests()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent._leave)
        start = trio.current_time()
        assert await requests.receive() == "draining"
        assert await requests.receive() == "deregister"
        assert trio.current_time() - start == pytest.approx(4.0)



async def test_metrics_endpoint_serves_the_counters(tmp_path: Path) -> None:
    with trio.socket.socket() as probe:  # a free port on loopback
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = BalancerConfig(vips=(VipConfig(address=VIP, ports=(80,)),), metrics=f"127.0.0.1:{port}",
                            control_socket=str(tmp_path / "ctl.sock"))
    listener, transport = MemoryListener(), RecordingTransport()
    balancer = Balancer(config, listener=listener, transports={"udp": transport})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(balancer.run)
            balancer.control.add_member(Member(name="a", address=ADDRESSES["a"], transport=PluginConfig(name="udp"),
                                               vips=(VIP,), weight=2, static=False))
            balancer.control.set_state("a", State.ACTIVE, "test")
            while balancer.control.rebuild_pending:
                await trio.sleep(0.01)
            for sport in range(10):
                listener.source.push(packet(sport + 100))
            listener.source.push(b"\xf0junk")
            await trio.testing.wait_all_tasks_blocked()

            async def ask(method: str, path: str) -> Reply:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    return await request(stream, method, path, host="127.0.0.1")

            async def get(path: str) -> str:
                reply = await ask("GET", path)
                return f"{reply.status}\n{reply.body.decode()}"

            reply = await ask("GET", "/metrics")
            assert reply.status == 200
            assert reply.header(b"content-type") == b"text/plain; version=0.0.4; charset=utf-8"
            text = reply.body.decode()
            assert "caplance_packets_in_total 11" in text
            assert 'caplance_forwarded_packets_total{backend="a"} 10' in text
            assert 'caplance_dropped_packets_total{reason="malformed_bad_version"} 1' in text
            assert 'caplance_backend_weight{backend="a"} 2' in text
            assert 'caplance_backend_up{backend="a"} 1' in text
            balancer.control.set_state("a", State.PAUSED, "test")
            paused = await get("/metrics")
            assert 'caplance_backend_up{backend="a"} 0' in paused  # not always 1
            assert 'caplance_backend_state{backend="a",state="paused"} 1' in paused
            assert 'caplance_backend_state{backend="a",state="active"} 0' in paused
            assert "caplance_conntrack_flows 10" in text
            assert (await get("/other")).startswith("404\n")
            head = await ask("HEAD", "/metrics")
            assert head.status == 200 and head.body == b"" and int(head.header(b"content-length") or 0) > 1000
            posted = await ask("POST", "/metrics")
            assert posted.status == 405 and posted.header(b"allow") == b"GET, HEAD"
            balancer.stop()
