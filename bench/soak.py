"""Soak: the lab for N minutes with churn, long and short flows and a SYN flood (not in CI).

    sudo python bench/soak.py [--minutes 10] [--plane python|tc] [--long 40] [--max-flows 50000]

A lab (a client, a balancer, six backends), a balancer taking agents on its control channel
(connection tracking on, its table bounded by ``--max-flows``), agents with an HTTP server
(port 80) and an echo server (port 8080) on be1..be4; be5 and be6 join later. From the client:

* long flows: ``--long`` TCP connections to VIP:8080 that each send a 64-byte chunk every
  ``--interval`` seconds for the whole run and check it comes back intact and in order. A
  connection that is reset, or whose echo stalls for ``--stall`` seconds, is *broken*; it is
  reopened a second later. A broken flow whose backend was killed or stopped while it was
  open is expected to break; any other is a broken flow to a healthy backend (a paused
  backend is healthy: pausing takes no flows away);
* short flows: HTTP requests to VIP:80 in a loop (``--rate`` a second), each on a new
  connection, counted ok or failed;
* churn every ``--churn`` seconds, in turn: an agent joins (be5, be6), one is paused and later
  resumed (``caplance ctl``), one is SIGKILLed and later restarted, one leaves (SIGTERM) and
  later comes back;
* a SYN flood: ``hping3 --flood --rand-source`` from the client to VIP:80 for
  ``--flood-seconds``, every ``--flood-every`` seconds (first at a fifth of the run), which
  fills the flow table.

Every ``--report`` seconds it prints elapsed time, the balancer's RSS (VmRSS, its process and
children), the flow-table size, requests ok/failed, long flows open, broken (all / to healthy
backends). At the end: a ``soak:`` summary line and the drops by reason. Ctrl-C and SIGTERM
remove the lab (the namespaces and every process in them). Exit status 1 if a flow to a healthy
backend broke or RSS grew more than ``--rss-slack`` MiB after the table first filled.
"""

from __future__ import annotations

import sys

# bench/selectors.py would shadow the standard library's selectors (subprocess needs it).
if sys.path and sys.path[0].rstrip("/").endswith("bench"):
    sys.path.pop(0)

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from caplance.lab import Lab
from caplance.lab.netns import LAB_NETWORK4, VIP4

PY = [sys.executable]
CAPLANCE = PY + ["-m", "caplance.cli"]
LAB = PY + ["-m", "caplance.lab"]
SOAK = PY + [str(Path(__file__).resolve())]
SECRET = "soak secret: correct horse battery staple"
ECHO_PORT = 8080
FIRST_AGENTS = ("be1", "be2", "be3", "be4")
JOINERS = ("be5", "be6")


# -- the client's two roles (run inside the client namespace) -------------------------------


def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


async def _long_flow(index: int, host: str, interval: float, stall: float, stop: Any) -> None:
    import trio

    from caplance.lab.http import echo_chunk, read_greeting

    while not stop.is_set():
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        await sock.bind(("0.0.0.0", 0))
        port, backend, chunks, opened = sock.getsockname()[1], None, 0, time.time()
        try:
            with trio.fail_after(5):
                await sock.connect((host, ECHO_PORT))
            stream = trio.SocketStream(sock)
            backend, buffered = await read_greeting(stream)
            _emit({"e": "open", "i": index, "b": backend, "port": port, "t": opened})
            while not stop.is_set():
                buffered = await echo_chunk(stream, buffered, index, chunks, timeout=stall)
                chunks += 1
                await trio.sleep(interval)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError) as exc:
            _emit({"e": "broken" if backend else "connect_failed", "i": index, "b": backend, "port": port,
                   "opened": opened, "t": time.time(), "chunks": chunks, "error": repr(exc)[:120]})
            await trio.sleep(1)
        finally:
            sock.close()


async def _long_client(host: str, count: int, interval: float, stall: float) -> None:
    import trio

    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(_long_flow, index, host, interval, stall, stop)
            async for _ in signals:
                stop.set()
                nursery.cancel_scope.cancel()
                break


async def _short_client(host: str, rate: float, timeout: float) -> None:
    import trio

    from caplance.lab import fetch_many

    ok = failed = 0
    errors: collections.Counter[str] = collections.Counter()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def loop() -> None:
                nonlocal ok, failed
                while True:  # batches of a second's worth: memory stays bounded
                    result = await fetch_many(host, count=max(1, int(rate)), concurrency=16,
                                              timeout=timeout, rate=rate)
                    ok += sum(result.served.values())
                    failed += result.failed
                    for failure in result.failures:  # "port N: error": counted by kind of error
                        errors[failure.partition(": ")[2].split("(")[0] or "?"] += 1
                    _emit({"e": "requests", "ok": ok, "failed": failed, "errors": dict(errors)})

            nursery.start_soon(loop)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


# -- the orchestra ---------------------------------------------------------------------------


class Drained:
    """Reads a process's stdout (JSON lines to ``handle``) and stderr (last lines kept), so
    its pipes never fill and block it."""

    def __init__(self, process: subprocess.Popen[bytes], handle: Any = None) -> None:
        self.process = process
        self.stderr: collections.deque[str] = collections.deque(maxlen=30)
        for stream, sink in ((process.stdout, handle), (process.stderr, None)):
            if stream is not None:
                threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    def _read(self, stream: Any, sink: Any) -> None:
        try:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                if sink is not None and line.startswith("{"):
                    try:
                        sink(json.loads(line))
                    except ValueError:
                        pass
                elif sink is None:
                    self.stderr.append(line)
        except (OSError, ValueError):
            pass


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, in KiB (0 if gone)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


class Soak:
    def __init__(self, lab: Lab, args: argparse.Namespace) -> None:
        self.lab, self.args = lab, args
        self.lock = threading.Lock()
        self.start = time.time()
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.servers: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.disturbed: dict[str, list[float]] = collections.defaultdict(list)  # kill/stop times
        self.opened = 0
        self.open_now: dict[int, str] = {}
        self.broken: list[dict[str, Any]] = []
        self.broken_healthy: list[dict[str, Any]] = []
        self.connect_failed = 0
        self.requests: dict[str, Any] = {"ok": 0, "failed": 0, "errors": {}}
        self.churn_log: list[str] = []
        self.samples: list[tuple[float, int, int]] = []  # (elapsed, rss KiB, flows)
        self.full_at: float | None = None
        self.status: dict[str, Any] = {}

    # configs and processes
    def balancer_config(self) -> dict[str, Any]:
        plane = self.args.plane
        return {
            "listener": {"kind": "tun"},
            "control_socket": str(self.lab.workdir / "balancer.sock"),
            "control": f"{self.lab.hosts['lb'].ipv4}:7000",
            "allowed_networks": [str(LAB_NETWORK4)],
            "heartbeat_timeout": 2.0, "proof_timeout": 2.0, "drain_idle": 0.2,
            "fastpath": {"mode": "tc" if plane == "tc" else "off"},
            "conntrack": {"enabled": True, "max_flows": self.args.max_flows},
            "vips": [{"address": str(VIP4), "protocol": "tcp", "ports": [80, ECHO_PORT], "backends": []}],
        }

    def env(self) -> dict[str, str]:
        return {**os.environ, "CAPLANCE_SECRET": SECRET,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def start_balancer(self) -> None:
        path = self.lab.write_config("balancer", self.balancer_config())
        self.balancer = self.lab.start("lb", *CAPLANCE, "balancer", "--print-stats", "--config", path,
                                       env=self.env())
        Drained(self.balancer)

    def start_servers(self, name: str) -> None:
        self.servers[name] = [self.lab.start(name, *LAB, "http", "--name", name, env=self.env()),
                              self.lab.start(name, *LAB, "echo", "--name", name, "--port", str(ECHO_PORT),
                                             env=self.env())]
        for process in self.servers[name]:
            Drained(process)

    def start_agent(self, name: str) -> None:
        if name not in self.servers:
            self.start_servers(name)
        config = {"name": name, "vips": [str(VIP4)], "balancer": f"{self.lab.hosts['lb'].ipv4}:7000",
                  "heartbeat_interval": 0.3, "drain_timeout": 1.0,
                  "fastpath": {"mode": "tc" if self.args.plane == "tc" else "off"}}
        path = self.lab.write_config(name, config)
        self.agents[name] = self.lab.start(name, *CAPLANCE, "agent", "--print-stats", "--config", path,
                                           env=self.env())
        Drained(self.agents[name])

    def ctl(self, *args: str) -> Any:
        done = self.lab.run("lb", *CAPLANCE, "ctl", "--socket", str(self.lab.workdir / "balancer.sock"),
                            "--json", *args)
        return json.loads(done.stdout)

    # the client's reports
    def on_long(self, event: dict[str, Any]) -> None:
        with self.lock:
            if event["e"] == "open":
                self.opened += 1
                self.open_now[event["i"]] = event["b"]
            elif event["e"] == "connect_failed":
                self.connect_failed += 1
                self.open_now.pop(event["i"], None)
            elif event["e"] == "broken":
                self.open_now.pop(event["i"], None)
                self.broken.append(event)
                hits = [t for t in self.disturbed.get(event["b"], []) if event["opened"] - 1 <= t <= event["t"]]
                if not hits:
                    self.broken_healthy.append(event)
                    self.say(f"broken flow to healthy backend {event['b']}: port {event['port']}, "
                             f"{event['chunks']} chunks, {event['error']}")

    def on_short(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.requests = event

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.start:7.1f}s] {text}", flush=True)

    # churn
    def churn_steps(self) -> Any:
        """The churn plan, one step per call, forever."""
        joined = list(FIRST_AGENTS)
        for name in JOINERS:
            yield f"join {name}", lambda n=name: (self.start_agent(n), joined.append(n))
        cycle = 0
        while True:
            victim = joined[cycle % len(joined)]
            yield f"pause {victim}", lambda v=victim: self.ctl("pause", v)
            yield f"resume {victim}", lambda v=victim: self.ctl("resume", v)
            victim = joined[(cycle + 2) % len(joined)]
            yield f"SIGKILL agent {victim}", lambda v=victim: self.kill(v)
            yield f"restart agent {victim}", lambda v=victim: self.start_agent(v)
            victim = joined[(cycle + 4) % len(joined)]
            yield f"stop agent {victim} (SIGTERM)", lambda v=victim: self.leave(v)
            yield f"start agent {victim}", lambda v=victim: self.start_agent(v)
            cycle += 1

    def kill(self, name: str) -> None:
        with self.lock:
            self.disturbed[name].append(time.time())
        self.agents[name].kill()
        self.agents[name].wait()

    def leave(self, name: str) -> None:
        with self.lock:
            self.disturbed[name].append(time.time())
        process = self.agents[name]
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # sampling
    def sample(self) -> None:
        elapsed = time.time() - self.start
        rss = rss_kib(self.balancer.pid)
        try:
            self.status = self.ctl("status")
        except (RuntimeError, ValueError) as exc:
            self.say(f"ctl status failed: {exc}")
        table = self.status.get("conntrack")
        flows = table.get("size", 0) if isinstance(table, dict) else 0
        fastpath = self.status.get("fastpath", {})
        if isinstance(fastpath, dict) and isinstance(fastpath.get("flows"), int):
            flows = max(flows, fastpath["flows"])
        evictions = sum(table.get("evictions", {}).values()) if isinstance(table, dict) else 0
        # Full: at its bound (the table bounds flows still opening, as a flood's, by a segment
        # of its own, so evictions are the sign it is full, not only ``max_flows``).
        if self.full_at is None and (evictions or flows >= 0.9 * self.args.max_flows):
            self.full_at = elapsed
        self.samples.append((elapsed, rss, flows))
        with self.lock:
            ok, failed = self.requests.get("ok", 0), self.requests.get("failed", 0)
            print(f"t={elapsed:6.0f}s rss={rss / 1024:7.1f}MiB flows={flows:6d} requests_ok={ok} "
                  f"requests_failed={failed} long_open={len(self.open_now)} long_opened={self.opened} "
                  f"broken={len(self.broken)} broken_healthy={len(self.broken_healthy)}", flush=True)

    def flood(self) -> subprocess.Popen[bytes]:
        self.say(f"SYN flood: hping3 --flood --rand-source to {VIP4}:80 for {self.args.flood_seconds}s")
        return self.lab.spawn("client", "timeout", "-s", "INT", str(self.args.flood_seconds), "hping3",
                              "-q", "-S", "-p", "80", "--flood", "--rand-source", str(VIP4),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def run(self) -> int:
        args = self.args
        self.start_balancer()
        for name in FIRST_AGENTS:
            self.start_agent(name)
        time.sleep(2)  # the agents' registrations
        self.long = self.lab.spawn("client", *SOAK, "--role", "long", "--long", str(args.long),
                                   "--interval", str(args.interval), "--stall", str(args.stall),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env())
        Drained(self.long, self.on_long)
        self.short = self.lab.spawn("client", *SOAK, "--role", "short", "--rate", str(args.rate),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env())
        Drained(self.short, self.on_short)
        self.start = time.time()
        duration = args.minutes * 60
        steps = self.churn_steps()
        next_churn, next_report = args.churn, 0.0
        next_flood = duration / 5 if args.flood_seconds > 0 else float("inf")
        flood: subprocess.Popen[bytes] | None = None
        while (elapsed := time.time() - self.start) < duration:
            if elapsed >= next_report:
                self.sample()
                next_report += args.report
            if elapsed >= next_churn:
                what, action = next(steps)
                self.say(f"churn: {what}")
                try:
                    action()
                except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                    self.say(f"churn step failed: {what}: {str(exc)[-300:]}")
                next_churn += args.churn
            if elapsed >= next_flood and shutil.which("hping3") and (flood is None or flood.poll() is not None):
                flood = self.flood()
                next_flood += args.flood_every
            time.sleep(0.2)
        self.sample()
        for process in (self.long, self.short):
            process.send_signal(signal.SIGTERM)
        time.sleep(1)
        return self.summary()

    def summary(self) -> int:
        args = self.args
        rss = [s[1] for s in self.samples]
        flows = [s[2] for s in self.samples]
        after_full = [s[1] for s in self.samples if self.full_at is not None and s[0] >= self.full_at]
        growth = (max(after_full) - after_full[0]) / 1024 if after_full else 0.0
        counters = self.status.get("counters", {})
        drops = dict(sorted(counters.get("dropped", {}).items(), key=lambda kv: -kv[1]))
        control = {k: v for k, v in sorted(self.status.get("control", {}).items()) if v}
        table = self.status.get("conntrack")
        expected = len(self.broken) - len(self.broken_healthy)
        print(f"soak: minutes={args.minutes:g} plane={args.plane} rss_start={rss[0] / 1024:.1f}MiB "
              f"rss_end={rss[-1] / 1024:.1f}MiB rss_max={max(rss) / 1024:.1f}MiB "
              f"rss_growth_after_full={growth:.1f}MiB (table full at "
              f"{'never' if self.full_at is None else f'{self.full_at:.0f}s'}) flows_max={max(flows)} "
              f"requests_ok={self.requests.get('ok', 0)} requests_failed={self.requests.get('failed', 0)} "
              f"long_opened={self.opened} broken={len(self.broken)} broken_expected={expected} "
              f"broken_healthy={len(self.broken_healthy)} connect_failed={self.connect_failed} "
              f"drops={json.dumps(drops)}", flush=True)
        print("drops by reason:", flush=True)
        for reason, count in drops.items():
            print(f"  {reason:28} {count}", flush=True)
        print(f"forwarded packets: {counters.get('packets_in', 0)} in; by backend "
              f"{json.dumps(counters.get('forwarded', {}))}", flush=True)
        if isinstance(table, dict):
            print(f"flow table: {json.dumps({k: table[k] for k in sorted(table)})}", flush=True)
        print(f"control events: {json.dumps(control)}", flush=True)
        print(f"short-flow failures by error: {json.dumps(self.requests.get('errors', {}))}", flush=True)
        for event in self.broken_healthy[:10]:
            print(f"  broken healthy: {json.dumps(event)}", flush=True)
        if len(self.broken) > len(self.broken_healthy):
            print(f"  broken expected (backend killed or stopped): "
                  f"{collections.Counter(e['b'] for e in self.broken if e not in self.broken_healthy)}")
        bad = bool(self.broken_healthy) or growth > args.rss_slack
        return 1 if bad else 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--plane", choices=["python", "tc"], default="python")
    parser.add_argument("--long", type=int, default=40, help="long-lived flows (default 40)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between a long flow's chunks")
    parser.add_argument("--stall", type=float, default=15, help="a long flow's echo this late: broken")
    parser.add_argument("--rate", type=float, default=50, help="short HTTP requests a second")
    parser.add_argument("--churn", type=float, default=8, help="seconds between churn steps")
    parser.add_argument("--flood-seconds", type=float, default=5, help="SYN flood length (0: none)")
    parser.add_argument("--flood-every", type=float, default=180, help="seconds between SYN floods")
    parser.add_argument("--max-flows", type=int, default=50_000, help="the balancer's flow table bound")
    parser.add_argument("--report", type=float, default=30, help="seconds between report lines")
    parser.add_argument("--rss-slack", type=float, default=8, help="MiB of RSS growth allowed once full")
    parser.add_argument("--role", choices=["long", "short"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        import trio

        if args.role == "long":
            trio.run(_long_client, str(VIP4), args.long, args.interval, args.stall)
        else:
            trio.run(_short_client, str(VIP4), args.rate, 5.0)
        return 0
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not shutil.which("hping3"):
        print("soak: hping3 not found: no SYN flood (apt-get install hping3)", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)
    with Lab(backends=len(FIRST_AGENTS) + len(JOINERS)) as lab:
        soak = Soak(lab, args)
        try:
            return soak.run()
        except KeyboardInterrupt:
            print("soak: interrupted; removing the lab", file=sys.stderr)
            if soak.samples:
                soak.summary()
            return 130


if __name__ == "__main__":
    sys.exit(main())
