"""Run every fuzz target for a bounded time and report executions and findings (``make fuzz``).

Each target runs under atheris (libFuzzer) for ``--seconds`` (``-max_total_time``) in its own
process, on a corpus under ``build/fuzz/<target>/corpus`` that grows from run to run and is
seeded with known-good inputs (valid packets, one frame of each message type, the TOML
examples of the docs). A target records each distinct finding there as
``finding-*.bin`` / ``finding-*.txt`` (the input and the traceback) and keeps going. The exit
status is 1 if any target has a finding, so ``make fuzz`` fails.

    python fuzz/run.py [--seconds 60] [--only packet,control_codec,config]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

TARGETS = ("packet", "control_codec", "config")


def _seed_packet(folder: Path) -> None:
    from caplance import encapsulation
    from caplance.packet import udp_packet

    v4 = udp_packet(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.99.0.1"), 40000, 80, b"x" * 30)
    v6 = udp_packet(ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd99::1"), 40000, 53, b"y" * 30)
    tcp = bytearray(v4)
    tcp[9] = 6
    tcp += bytes(20)
    tcp[2:4] = len(tcp).to_bytes(2, "big")
    tcp[20 + 12] = 0x50
    tcp[20 + 13] = 0x02
    seeds = {
        "v4_udp": b"\x00" + v4, "v6_udp": b"\x00" + v6, "v4_syn": b"\x01" + bytes(tcp),
        "key4": b"\x03" + bytes(13), "key6": b"\x03" + bytes(37),
        "gre": b"\x04" + encapsulation.gre_encapsulate(v4),
        "udp": b"\x05" + encapsulation.udp_encapsulate(v6, 50000, 7001),
        "gue": b"\x06" + v4, "outer": b"\x07" + v4,
        "segment": b"\x08" + bytes((2, 14, 16)) + bytes(tcp) + b"z" * 64,
    }
    for name, data in seeds.items():
        (folder / f"seed-{name}").write_bytes(data)


def _seed_control_codec(folder: Path) -> None:
    from caplance import control_codec as codec

    samples = [
        codec.message("hello", name="be1", nonce=codec.new_nonce()),
        codec.message("challenge", nonce="ab", proof="cd"),
        codec.message("register", name="be1", data_address="10.0.0.11", transport={"name": "udp"},
                      vips=["10.99.0.1"], weight=1, proof="ef", decap="agent"),
        codec.message("welcome"), codec.message("proof", token="abc123"), codec.message("active"),
        codec.message("refused", reason="auth"), codec.message("heartbeat", seq=7, healthy=True),
        codec.message("state", state="paused"), codec.message("deregister"),
        codec.message("command", command="status", args=[]),
        codec.message("reply", ok=True, result={"backends": []}),
    ]
    for index, msg in enumerate(samples):
        (folder / f"seed-{msg['type']}").write_bytes(bytes((0x80 | index,)) + codec.encode(msg))
    (folder / "seed-structured").write_bytes(b"\x00" + bytes(range(64)))


def _seed_config(folder: Path) -> None:
    blocks: list[str] = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        blocks += re.findall(r"```toml\n(.*?)```", page.read_text(), flags=re.DOTALL)
    for index, block in enumerate(blocks):
        (folder / f"seed-doc{index}-balancer").write_bytes(b"\x00" + block.encode())
        (folder / f"seed-doc{index}-agent").write_bytes(b"\x01" + block.encode())
    minimal = {"vips": [{"address": "10.99.0.1", "ports": [80],
                         "backends": [{"name": "be1", "address": "10.0.0.11"}]}]}
    (folder / "seed-data").write_bytes(b"\x02" + json.dumps(minimal).encode())
    (folder / "seed-env").write_bytes(
        b"\x00" + b'[[vips]]\naddress = "10.99.0.1"\n\n%%\nVIPS__0__PORTS=[80, 443]\nLISTENER__KIND=raw\n')


SEEDS = {"packet": _seed_packet, "control_codec": _seed_control_codec, "config": _seed_config}


def run(target: str, seconds: int, artifacts: Path) -> tuple[int, int, list[str]]:
    """Fuzz ``target`` for ``seconds``; returns (executions, exec/s, findings)."""
    folder = artifacts / target
    corpus = folder / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("finding-*"):
        old.unlink()
    SEEDS[target](corpus)
    command = [sys.executable, str(HERE / f"fuzz_{target}.py"), f"-max_total_time={seconds}",
               "-print_final_stats=1", "-max_len=4096", "-timeout=10", "-rss_limit_mb=2048",
               f"-artifact_prefix={folder}/"]
    if (HERE / f"{target}.dict").exists():
        command.append(f"-dict={HERE / f'{target}.dict'}")
    command.append(str(corpus))
    env = {**os.environ, "FUZZ_ARTIFACTS": str(artifacts),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", check=False)
    (folder / "last-run.log").write_text(result.stdout)
    stats = dict(re.findall(r"^stat::(\w+):\s+(\d+)", result.stdout, flags=re.MULTILINE))
    findings = [path.read_text().splitlines()[0] for path in sorted(folder.glob("finding-*.txt"))]
    if result.returncode != 0 and not findings:  # libFuzzer itself stopped: a crash, a timeout, OOM
        crash = next(iter(sorted(folder.glob("crash-*")) + sorted(folder.glob("timeout-*"))
                          + sorted(folder.glob("oom-*"))), None)
        findings.append(f"libFuzzer exit {result.returncode}" + (f" ({crash.name})" if crash else "")
                        + f"; see {folder / 'last-run.log'}")
    return int(stats.get("number_of_executed_units", 0)), int(stats.get("average_exec_per_sec", 0)), findings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "60")),
                        help="time per target (default 60, or $FUZZ_SECONDS)")
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument("--artifacts", type=Path, default=ROOT / "build" / "fuzz")
    args = parser.parse_args()
    failed = False
    for target in args.only.split(","):
        print(f"fuzz: {target}: {args.seconds} s ...", flush=True)
        executions, rate, findings = run(target, args.seconds, args.artifacts.resolve())
        print(f"fuzz: {target}: executions={executions} ({rate}/s) findings={len(findings)}", flush=True)
        for finding in findings:
            print(f"fuzz: {target}:   {finding}", flush=True)
        failed |= bool(findings)
    if failed:
        print(f"fuzz: findings saved under {args.artifacts}/<target>/finding-*", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
