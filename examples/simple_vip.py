"""Caplance in one file: a VIP balanced over three backends, with direct server return.

    sudo python examples/simple_vip.py [--requests 300] [--listener tun|raw|packet]

It builds a lab of network namespaces (a client, a balancer, three backends, a switch),
runs one process per host, makes HTTP requests from the client to http://VIP/, prints who
served them and removes the lab again -- also on Ctrl-C or SIGTERM (as ``timeout`` or a
service manager stops it). Each host's process uses the
library the way you would on a real machine: ``Balancer`` on the balancer, ``Agent`` plus an
HTTP server on each backend.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import subprocess
import sys
from collections.abc import Collection

import trio

from caplance import (
    Agent,
    AgentConfig,
    BackendConfig,
    Balancer,
    BalancerConfig,
    ListenerConfig,
    VipConfig,
)
from caplance.lab import Lab, fetch_many, serve_name
from caplance.lab.http import format_served
from caplance.lab.netns import VIP4

BACKENDS = {"be1": "10.77.0.11", "be2": "10.77.0.12", "be3": "10.77.0.13"}
BALANCER = "10.77.0.2"


# -- what runs on each host ----------------------------------------------------------------

async def run_until_signalled(service: Balancer | Agent, *, also_serve: str | None = None) -> None:
    """Start ``service`` (and an HTTP server answering ``also_serve``), say "ready", stop on
    SIGTERM/SIGINT, then print the service's counters as JSON."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            if also_serve:
                await nursery.start(serve_name, also_serve)
            print("ready", flush=True)
            async for _ in signals:
                service.stop()
                nursery.cancel_scope.cancel()  # the HTTP server
                break
    print(json.dumps(service.snapshot()), flush=True)


async def balancer_host(listener: str, ctl_socket: str) -> None:
    config = BalancerConfig(
        listener=ListenerConfig(kind=listener, interface="eth0" if listener == "packet" else None),
        vips=(VipConfig(
            address=VIP4, protocol="tcp", ports=(80,),
            backends=tuple(BackendConfig(name=name, address=ipaddress.ip_address(address))
                           for name, address in BACKENDS.items()),
        ),),
        control_socket=ctl_socket,  # in the lab's folder: a real balancer may use the default
        drain_idle=0.2,
    )
    balancer = Balancer(config)
    await run_until_signalled(balancer)


async def backend_host(name: str) -> None:
    agent = Agent(AgentConfig(name=name, vips=(VIP4,), balancers=(ipaddress.ip_address(BALANCER),)))
    await run_until_signalled(agent, also_serve=name)


async def client_host(requests: int) -> None:
    result = await fetch_many(str(VIP4), count=requests, keep=False)  # counts: the same memory for any number
    print(json.dumps({"served": result.served, "failed": result.failed, "failures": result.failures}), flush=True)


# -- the orchestra: build the lab, run the hosts, report -----------------------------------

async def wait_ready(process: trio.Process, role: str) -> None:
    assert process.stdout is not None
    with trio.fail_after(20):
        seen = b""
        while b"ready\n" not in seen:
            chunk = await process.stdout.receive_some()
            if not chunk:
                raise RuntimeError(f"{role} exited before it was ready")
            seen += chunk


async def read_json_line(process: trio.Process) -> dict[str, object]:
    assert process.stdout is not None
    data = b""
    with trio.fail_after(30):
        while chunk := await process.stdout.receive_some():
            data += chunk
    lines = [line for line in data.decode().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


async def stop_all(processes: Collection[trio.Process], *, grace: float = 5) -> None:
    """SIGTERM the host processes still running (the balancer and agents then undo what they
    did), wait up to ``grace`` seconds, SIGKILL what is left."""
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    with trio.move_on_after(grace):
        for process in processes:
            await process.wait()
    for process in processes:
        process.kill()  # no-op for those that exited
        await process.wait()


async def orchestrate(lab: Lab, requests: int, listener: str) -> int:
    me = [sys.executable, __file__]
    hosts = {"lb": me + ["--host", "balancer", "--listener", listener,
                         "--ctl-socket", str(lab.workdir / "balancer.sock")]}
    hosts |= {name: me + ["--host", name] for name in BACKENDS}
    processes = {}
    try:
        for role, argv in hosts.items():
            processes[role] = await trio.lowlevel.open_process(lab.command(role, *argv),
                                                               stdout=subprocess.PIPE)
        for role, process in processes.items():
            await wait_ready(process, role)
        client = await trio.run_process(
            lab.command("client", *me, "--host", "client", "--requests", str(requests)),
            capture_stdout=True, check=True)
        result = json.loads(client.stdout.decode().splitlines()[-1])
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        stats = {role: await read_json_line(process) for role, process in processes.items()}
    finally:  # also on Ctrl-C or SIGTERM (the lab makes it a KeyboardInterrupt too)
        await stop_all(processes.values())

    served: dict[str, int] = result["served"]
    failed: int = result["failed"]
    failures: list[str] = result["failures"]
    forwarded = stats["lb"].get("forwarded", {})
    print(f"{'backend':8} {'address':12} {'served':>7} {'packets fwd':>12} {'injected':>9}")
    for name, address in BACKENDS.items():
        injected = stats[name].get("injected", 0)
        print(f"{name:8} {address:12} {served.get(name, 0):>7} {forwarded.get(name, 0):>12} {injected:>9}")
    print(f"requests: {requests}, failed: {failed}; balancer dropped: {stats['lb'].get('dropped')}")
    for failure in failures[:10]:
        print(f"  {failure}")
    print(format_served(served, list(BACKENDS)))
    ok = not failed and all(served.get(name, 0) > 0 for name in BACKENDS)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--listener", default="tun", choices=["tun", "raw", "packet"])
    parser.add_argument("--host", help=argparse.SUPPRESS)  # set when re-run inside a lab host
    parser.add_argument("--ctl-socket", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.host == "balancer":
        trio.run(balancer_host, args.listener, args.ctl_socket)
    elif args.host == "client":
        trio.run(client_host, args.requests)
    elif args.host in BACKENDS:
        trio.run(backend_host, args.host)
    else:
        with Lab(backends=len(BACKENDS)) as lab:
            return trio.run(orchestrate, lab, args.requests, args.listener)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except* KeyboardInterrupt:  # trio may deliver it inside an exception group
        print("interrupted; the lab has been removed", file=sys.stderr)
        sys.exit(130)
