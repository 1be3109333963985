"""HTTP through a VIP to three backends, in network namespaces, with real packets."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from caplance.lab import Lab
from caplance.lab.netns import VIP4, VIP6
from tests.integration import services
from tests.integration.services import (
    balancer_config,
    expected_backend,
    fetch,
    start_backend,
    start_backend_agent,
    start_balancer,
)

BACKENDS = ("be1", "be2", "be3")
ROOT = Path(__file__).resolve().parents[2]


def start_all(lab: Lab, listener: str, vips: tuple = (VIP4,)) -> list[subprocess.Popen[bytes]]:
    processes = []
    for name in BACKENDS:
        processes += start_backend(lab, name, vips=vips)
    processes.append(start_balancer(lab, balancer_config(lab, listener=listener, vips=vips)))
    return processes


LISTENERS = ["tun", "raw", "packet", "nfqueue"]


@pytest.mark.usefixtures("both_planes")
@pytest.mark.parametrize("listener", LISTENERS)
def test_http_through_the_vip_reaches_the_backend_maglev_picks(lab: Lab, listener: str) -> None:
    start_all(lab, listener)
    result = fetch(lab, 150)
    assert result["failures"] == []
    assert set(result["served"]) == set(BACKENDS)
    for attempt in result["attempts"]:
        assert attempt["served_by"] == expected_backend(lab, BACKENDS, attempt["source_port"])


@pytest.mark.usefixtures("both_planes")
@pytest.mark.parametrize("listener", LISTENERS)
def test_large_uploads_pass_every_listener(lab: Lab, listener: str) -> None:
    """200 KB POSTs: the client's TSO hands raw and packet sockets 64 KB aggregates with
    partial checksums, which must reach the backends as valid segments."""
    start_all(lab, listener)
    result = fetch(lab, 8, body=200_000, timeout=15)
    assert result["failures"] == []
    assert sum(result["served"].values()) == 8


@pytest.mark.usefixtures("both_planes")
@pytest.mark.parametrize("listener", ["tun", "packet", "nfqueue"])
def test_ipv6_vip(lab: Lab, listener: str) -> None:
    start_all(lab, listener, vips=(VIP4, VIP6))
    result = fetch(lab, 60, host=str(VIP6))
    assert result["failures"] == []
    assert set(result["served"]) == set(BACKENDS)
    for attempt in result["attempts"]:
        assert attempt["served_by"] == expected_backend(lab, BACKENDS, attempt["source_port"], vip=VIP6)


def nft_counter(lab: Lab, role: str, name: str) -> int:
    listing = lab.run(role, "nft", "list", "counter", "netdev", "dsr", name).stdout
    return int(re.search(r"packets (\d+)", listing).group(1))  # type: ignore[union-attr]


def count_on_ingress(lab: Lab, role: str, counters: dict[str, str]) -> None:
    """Count packets arriving on ``role``'s eth0, before anything else sees them."""
    rules = "".join(f"counter {name} {{}}\n" for name in counters)
    rules += "chain in { type filter hook ingress device eth0 priority -500;\n"
    rules += "".join(f"{match} counter name {name}\n" for name, match in counters.items())
    lab.run(role, "nft", "-f", "-", input=f"table netdev dsr {{\n{rules}}}\n}}\n")


@pytest.mark.usefixtures("both_planes")
def test_direct_server_return_replies_never_touch_the_balancer(lab: Lab) -> None:
    """Counted on the switch's port toward the balancer (a kernel data plane takes packets
    before the balancer's own nftables would see them) and on the client."""
    lb_mac = lab.run("lb", "cat", "/sys/class/net/eth0/address").stdout.strip()
    rules = "".join(f"counter {name} {{}}\n" for name in ("to_lb", "from_lb_vip", "from_lb_wrapped"))
    rules += "chain to_lb { type filter hook ingress device client priority -500;\n"
    rules += f"ether daddr {lb_mac} ip daddr {VIP4} counter name to_lb\n}}\n"
    rules += "chain from_lb { type filter hook ingress device lb priority -500;\n"
    rules += f"ip saddr {VIP4} counter name from_lb_vip\n"
    rules += f"ip saddr {lab.hosts['lb'].ipv4} udp dport 7001 counter name from_lb_wrapped\n}}\n"
    lab.run_switch("nft", "-f", "-", input=f"table netdev dsr {{\n{rules}}}\n")
    count_on_ingress(lab, "client", {
        "via_lb": f"ether saddr {lb_mac} ip saddr {VIP4}",
        "direct": f"ether saddr != {lb_mac} ip saddr {VIP4}",
    })
    start_all(lab, "tun")
    result = fetch(lab, 60)
    assert result["failures"] == []
    switch = lab.run_switch("nft", "list", "table", "netdev", "dsr").stdout

    def counted(name: str) -> int:
        return int(re.search(rf"counter {name} {{\s*packets (\d+)", switch).group(1))  # type: ignore[union-attr]

    assert counted("to_lb") >= 60 * 3  # requests go to the balancer...
    assert counted("from_lb_wrapped") >= 60 * 3  # ...which sends them on, wrapped,
    assert counted("from_lb_vip") == 0  # but never a reply from the VIP,
    assert nft_counter(lab, "client", "via_lb") == 0
    assert nft_counter(lab, "client", "direct") >= 60 * 3  # replies come from the backends' MACs


@pytest.mark.usefixtures("both_planes")
def test_a_stopped_backend_loses_only_its_own_flows(lab: Lab) -> None:
    processes = start_all(lab, "tun")
    for be2 in processes[2:4]:  # its agent and its service (a kernel decap outlives the agent)
        be2.kill()
        be2.wait()
    result = fetch(lab, 150, timeout=2)
    lost = [a for a in result["attempts"] if a["served_by"] is None]
    kept = [a for a in result["attempts"] if a["served_by"] is not None]
    assert lost and kept
    for attempt in lost:
        assert expected_backend(lab, BACKENDS, attempt["source_port"]) == "be2"
    for attempt in kept:
        assert attempt["served_by"] == expected_backend(lab, BACKENDS, attempt["source_port"])
        assert attempt["served_by"] != "be2"


def iptables_listing(lab: Lab, role: str) -> str:
    return lab.run(role, "iptables-save").stdout + lab.run(role, "ip6tables-save").stdout


@pytest.mark.usefixtures("both_planes")
@pytest.mark.parametrize("listener", LISTENERS)
def test_stop_leaves_nothing_behind(lab: Lab, listener: str) -> None:
    before = {role: lab.listing(role) + iptables_listing(lab, role) for role in ("lb", *BACKENDS)}
    processes = start_all(lab, listener, vips=(VIP4,) if listener == "raw" else (VIP4, VIP6))
    assert lab.listing("lb") + iptables_listing(lab, "lb") != before["lb"]  # the balancer did change things...
    assert fetch(lab, 30)["failures"] == []
    stats = [lab.stop(process) for process in reversed(processes)]
    assert stats[0]["packets_in"] > 0
    for role, listing in before.items():  # ...and put everything back
        assert lab.listing(role) + iptables_listing(lab, role) == listing, role


def test_nfqueue_bypass_keeps_traffic_flowing_when_the_balancer_is_gone(lab: Lab) -> None:
    """A SIGKILLed balancer leaves its queue rule behind; with --queue-bypass packets then
    follow the routing table -- here an operator's fallback route to be1 -- instead of
    being dropped for want of a reader."""
    processes = start_all(lab, "nfqueue")
    assert set(fetch(lab, 60)["served"]) == set(BACKENDS)
    lab.sysctl("lb", "net.ipv4.ip_forward", "1")
    lab.run("lb", "ip", "route", "add", f"{VIP4}/32", "via", str(lab.hosts["be1"].ipv4))
    balancer = processes[-1]
    balancer.kill()
    balancer.wait()
    assert "NFQUEUE" in lab.run("lb", "iptables-save", "-t", "raw").stdout  # the rule is still there
    after = fetch(lab, 30)
    assert after["failures"] == [] and set(after["served"]) == {"be1"}


def test_injection_through_tun_needs_loose_rp_filter(lab: Lab) -> None:
    for role in BACKENDS:
        lab.sysctl(role, "net.ipv4.conf.all.rp_filter", "1")
    start_backend(lab, "be1", inject="tun")
    start_backend(lab, "be2")  # raw injection: fine with strict rp_filter
    start_backend(lab, "be3")
    start_balancer(lab, balancer_config(lab))
    first = fetch(lab, 60)
    assert first["failures"] == []
    assert set(first["served"]) == set(BACKENDS)
    # The agent set rp_filter=2 (loose) on its TUN device; with strict mode be1's flows die.
    lab.sysctl("be1", "net.ipv4.conf.caplance-in.rp_filter", "1")
    second = fetch(lab, 60, timeout=1.5)
    for attempt in second["attempts"]:
        owner = expected_backend(lab, BACKENDS, attempt["source_port"])
        assert (attempt["served_by"] is None) == (owner == "be1")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_demo_serves_every_request_and_cleans_up() -> None:
    before = namespaces()
    done = subprocess.run([sys.executable, str(ROOT / "examples/simple_vip.py"), "--requests", "300"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    counts = re.fullmatch(r"served: be1=(\d+) be2=(\d+) be3=(\d+)", last)
    assert counts, last
    assert sum(map(int, counts.groups())) == 300 and all(int(n) > 0 for n in counts.groups())
    assert namespaces() == before


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:  # it exited meanwhile
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.add(int(status.parent.name))
    return found


def netns_of(pid: int) -> str | None:
    """The name of the namespace process ``pid`` runs in (None: none we can name, or gone)."""
    out = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def remove_lab(tag: str) -> None:
    """Whatever is left of lab ``tag``: its processes, namespaces and work directory."""
    for name in [n for n in namespaces() if n.startswith(f"{tag}-")]:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    for folder in Path(tempfile.gettempdir()).glob(f"{tag}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def stop_the_demo(stop: Callable[[subprocess.Popen[bytes]], None]) -> None:
    """Start the demo, wait until its client runs, ``stop`` it; check it removed its six
    namespaces, its five host processes and its work directory, and exited 130. Its client is
    asked for three million requests: it must be running (counting in bounded memory) when
    stopped. Whatever the demo left is removed, also when the test fails. Other labs may come
    and go meanwhile (tests run in parallel): only the demo's own are looked at."""
    with tempfile.TemporaryFile() as output:  # not a pipe: the hosts inherit it, may outlive the demo
        stop_the_demo_writing_to(stop, output)


def stop_the_demo_writing_to(stop: Callable[[subprocess.Popen[bytes]], None], output: IO[bytes]) -> None:
    demo = subprocess.Popen([sys.executable, str(ROOT / "examples/simple_vip.py"), "--requests", "3000000"],
                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    def said() -> str:
        output.seek(0)
        return output.read().decode(errors="replace")[-2000:]

    tag = None
    try:
        hosts: dict[str, int] = {}  # the demo's host processes: namespace -> pid
        deadline = time.monotonic() + 90
        while not any(name.endswith("-client") for name in hosts):
            assert demo.poll() is None, said()
            assert time.monotonic() < deadline, f"the demo's client never started: {hosts}"
            for pid in children(demo.pid) - set(hosts.values()):
                if (name := netns_of(pid)) is not None:
                    hosts[name] = pid
                    tag = name.rsplit("-", 1)[0]  # the lab's: "<tag>-<role>"
            time.sleep(0.2)
        made = {n for n in namespaces() if n.startswith(f"{tag}-")}
        assert made == {f"{tag}-{role}" for role in ("sw", "client", "lb", "be1", "be2", "be3")}
        assert len(hosts) == 5 and all(alive(pid) for pid in hosts.values())
        time.sleep(2)  # traffic flows
        assert all(alive(pid) for pid in hosts.values()), "a host process ended before the signal"
        stop(demo)
        code = demo.wait(timeout=60)
        assert not [n for n in namespaces() if n.startswith(f"{tag}-")], said()
        assert not [pid for pid in hosts.values() if alive(pid)], said()
        assert not list(Path(tempfile.gettempdir()).glob(f"{tag}-*"))
        assert code == 130, said()
        assert "interrupted; the lab has been removed" in said()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        if tag is not None:
            remove_lab(tag)


def test_demo_cleans_up_on_ctrl_c() -> None:
    stop_the_demo(lambda demo: os.killpg(demo.pid, signal.SIGINT))  # a terminal's Ctrl-C: the whole group


def test_demo_cleans_up_on_sigterm() -> None:
    """As ``timeout`` or a service manager stops it: SIGTERM to the demo alone."""
    stop_the_demo(lambda demo: demo.send_signal(signal.SIGTERM))


def attached(lab: Lab, role: str) -> str:
    """What a host has attached to its interfaces: tc qdiscs and filters, XDP programs."""
    return "\n".join([lab.run(role, "tc", "qdisc", "show").stdout,
                      lab.run(role, "tc", "filter", "show", "dev", "eth0", "ingress").stdout,
                      "".join(line for line in lab.run(role, "ip", "-o", "link", "show").stdout.splitlines(True)
                              if "xdp" in line)])


def test_nothing_stays_attached_after_sigkill_restart_and_ctrl_c(lab: Lab) -> None:
    services.use_plane("kernel")
    try:
        before = {role: attached(lab, role) for role in ("lb", *BACKENDS)}
        processes = start_all(lab, "tun")
        assert fetch(lab, 30)["failures"] == []
        assert attached(lab, "lb") != before["lb"] and attached(lab, "be1") != before["be1"]
        for process in (processes[-1], processes[0]):  # the balancer and be1's agent, killed
            process.kill()
            process.wait()
        config = balancer_config(lab, listener="tun")
        balancer = start_balancer(lab, config)  # again, over what the dead one left
        agent = start_backend_agent(lab, "be1")
        assert fetch(lab, 30)["failures"] == []
        for process in (balancer, agent):
            process.send_signal(signal.SIGINT)  # Ctrl-C
            assert process.wait(timeout=20) == 0
        for role in ("lb", "be1"):
            assert attached(lab, role) == before[role], role
    finally:
        services.use_plane("python")
