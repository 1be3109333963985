"""The ``caplance`` command end to end, in subprocesses: ``config check`` and ``config show``,
bad files and bad environment variables, secrets never printed, exit codes.

Also the example plugin chosen by name from a config file: ``config check`` accepts it and a
balancer built from that file forwards by it (in-memory listener and transport: no root).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trio
import trio.testing

from caplance.balancer import Balancer
from caplance.cli import build_parser, load_checked
from caplance.config import BalancerConfig
from caplance.configfile import load_agent_config, load_balancer_config
from caplance.packet import flow_key
from caplance.testing import MemoryListener, RecordingTransport
from tests.builders import ipv4, tcp

from .test_selectors import example_plugin  # noqa: F401 - the fixture that installs it

BALANCER: dict[str, Any] = {
    "control": "10.0.0.2:7000",
    "allowed_networks": ["10.0.0.0/24"],
    "listener": {"kind": "tun"},
    "vips": [
        {"address": "10.99.0.1", "ports": [80], "backends": [
            {"name": "be1", "address": "10.0.0.11"},
            {"name": "be2", "address": "10.0.0.12", "weight": 2},
        ]},
        {"address": "2001:db8::1", "protocol": "udp", "selector": {"name": "ring"}},
    ],
}
AGENT: dict[str, Any] = {"name": "be1", "vips": ["10.99.0.1"], "balancer": "10.0.0.2:7000"}
SECRET = "hunter2-0d8f1c-5a9e7b"
FILE_SECRET = "file-secret-77a1e3"


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "caplance.toml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else tomli_w.dumps(data))
    return path


def caplance(*args: str | Path, env: dict[str, str] | None = None, entry_point: bool = False,
             secret: str | None = SECRET) -> subprocess.CompletedProcess[str]:
    """Run the command with a clean environment (no CAPLANCE_* from the caller) plus
    ``CAPLANCE_SECRET=secret`` (None: no secret) and ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CAPLANCE_")}
    if secret is not None:
        environ["CAPLANCE_SECRET"] = secret
    environ.update(env or {})
    command = ([str(Path(sys.executable).with_name("caplance"))] if entry_point
               else [sys.executable, "-m", "caplance.cli"])
    return subprocess.run([*command, *map(str, args)], env=environ, capture_output=True, text=True,
                          timeout=60, check=False)


def problem_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.strip() for line in done.stderr.splitlines() if line.startswith("  @ ")]


def assert_invalid(done: subprocess.CompletedProcess[str], path: Path, expected: list[str]) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines()[0] == f"caplance: invalid configuration {path}:"
    assert problem_lines(done) == expected


# -- config check ---------------------------------------------------------------------------


def test_check_accepts_a_valid_balancer(tmp_path: Path) -> None:
    path = write(tmp_path, BALANCER)
    done = caplance("config", "check", path, entry_point=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{path}: valid balancer configuration\n", "")


def test_an_agent_config_is_known_by_its_top_level_name(tmp_path: Path) -> None:
    path = write(tmp_path, AGENT)
    done = caplance("config", "check", path)
    assert (done.returncode, done.stdout) == (0, f"{path}: valid agent configuration\n")
    done = caplance("config", "check", "--kind", "balancer", path)
    assert_invalid(done, path, ['@ $.vips[0]: expected a table, got "10.99.0.1"',
                                '@ $: unknown key "balancer"', '@ $: unknown key "name"'])


def test_a_bad_file_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, """\
control = "10.0.0.2"
secret = "in-the-file"

[listener]
kind = "tun"
devices = "caplance0"

[[vips]]
address = "10.99.0.1"
ports = [80, "http"]

[[vips.backends]]
name = "be1"
address = "10.0.0.300"
weight = -1
""")
    done = caplance("config", "check", path)
    assert_invalid(done, path, [
        '@ $.vips[0].ports[1]: expected an int from 1 to 65535, got "http"',
        '@ $.vips[0].backends[0].address: expected an IP address, got "10.0.0.300"',
        "@ $.vips[0].backends[0].weight: expected an int from 0 to 65535, got -1",
        '@ $.listener: unknown key "devices"',
        '@ $.control: expected "address:port" (IPv6: "[address]:port"), got "10.0.0.2"',
        ("@ $.secret: secrets may not be written in a config file; put it in a file named by"
        " secret_file, or in CAPLANCE_SECRET"),
    ])
    assert "in-the-file" not in done.stderr


@pytest.mark.parametrize(("text", "message"), [
    ("vips = [", "is not valid TOML"),
    (None, "cannot read"),
])
def test_an_unreadable_file_is_an_invalid_configuration(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "caplance.toml" if text is None else write(tmp_path, text)
    done = caplance("config", "check", path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = problem_lines(done)
    assert line.startswith(f"@ $: {path}" if text else "@ $: cannot read") and message in line


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("CAPLANCE_VIPS__0__PORTS", '["http"]',
     '@ $.vips[0].ports[0] (from CAPLANCE_VIPS__0__PORTS): expected an int from 1 to 65535, got "http"'),
    ("CAPLANCE_DRAIN_TIMEOUT", "soon",
     '@ $.drain_timeout (from CAPLANCE_DRAIN_TIMEOUT): expected a number of seconds > 0, got "soon"'),
    ("CAPLANCE_LISTENER__KINDS", "raw",
     '@ $.listener (from CAPLANCE_LISTENER__KINDS): unknown key "kinds" (keys here: kind, interface, device, options)'),
    ("CAPLANCE_VIPS__5__ADDRESS", "10.99.0.5",
     "@ $.vips[5] (from CAPLANCE_VIPS__5__ADDRESS): no list item 5: the list has 2; add items in order (2 next)"),
])
def test_a_bad_environment_variable_is_named(tmp_path: Path, variable: str, value: str, expected: str) -> None:
    path = write(tmp_path, BALANCER)
    done = caplance("config", "check", path, env={variable: value})
    assert_invalid(done, path, [expected])


@pytest.mark.parametrize(("change", "expected"), [
    ({"selector": {"name": "maglev", "options": {"table_size": 7}}},
     ("@ $.vips[0].selector: caplance.selectors plugin 'maglev': maglev: table_size 7 is below"
     " 100 x 2 backends; pick a prime of at least that size for even balance")),
    ({"selector": {"name": "maglev", "options": {"table_size": 65536}}},
     "@ $.vips[0].selector: caplance.selectors plugin 'maglev': maglev: table_size must be a prime, got 65536"),
    ({"selector": {"name": "maglev", "options": {"tablesize": 65537}}},
     "@ $.vips[0].selector: caplance.selectors plugin 'maglev': maglev: unknown option(s) tablesize"),
    ({"selector": {"name": "no-such-selector"}},
     "@ $.vips[0].selector: caplance.selectors plugin 'no-such-selector': not registered (available: "),
    ({"backends": [{"name": "be1", "address": "10.0.0.11", "transport": {"name": "udp", "options": {"port": 0}}}]},
     ("@ $.vips[0].backends[0].transport: caplance.transports plugin 'udp': udp: port must be an int"
     " from 1 to 65535, got 0")),
])
def test_check_validates_the_plugins_options(tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    data = {**BALANCER, "vips": [{**BALANCER["vips"][0], **change}, BALANCER["vips"][1]]}
    path = write(tmp_path, data)
    done = caplance("config", "check", path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = problem_lines(done)
    assert line.startswith(expected)


def test_an_agents_transport_options_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, {**AGENT, "transport": {"name": "udp", "options": {"colour": "red"}}})
    done = caplance("config", "check", path)
    assert done.returncode == 2
    [line] = problem_lines(done)
    assert line.startswith("@ $.transport: caplance.transports plugin 'udp':") and "colour" in line


def test_a_bad_command_line_exits_2(tmp_path: Path) -> None:
    for args in (["config", "check"], ["config", "lint", "x.toml"], ["balancer"]):
        done = caplance(*args)
        assert done.returncode == 2 and "usage: caplance" in done.stderr and "Traceback" not in done.stderr


# -- config show ----------------------------------------------------------------------------


def test_show_prints_the_effective_config_without_the_secret(tmp_path: Path) -> None:
    path = write(tmp_path, BALANCER)
    done = caplance("config", "show", path, env={
        "CAPLANCE_SECRET": SECRET, "CAPLANCE_LISTENER__KIND": "raw", "CAPLANCE_VIPS__0__PORTS": "[80, 443]",
        "CAPLANCE_VIPS__0__BACKENDS__2__NAME": "be3", "CAPLANCE_VIPS__0__BACKENDS__2__ADDRESS": "10.0.0.13",
    })
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert '# secret = "***"  (from CAPLANCE_SECRET; never shown)' in done.stdout.splitlines()
    shown = tomllib.loads(done.stdout)
    assert shown["listener"]["kind"] == "raw"
    assert shown["vips"][0]["ports"] == [80, 443]
    assert [b["name"] for b in shown["vips"][0]["backends"]] == ["be1", "be2", "be3"]
    assert shown["drain_timeout"] == 10.0  # defaults filled in
    assert "secret" not in shown


def test_show_never_prints_the_secret_files_contents(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(FILE_SECRET + "\n")
    path = write(tmp_path, {**AGENT, "secret_file": str(secret_file)})
    done = caplance("config", "show", path, secret=None)
    assert done.returncode == 0, done.stderr
    assert FILE_SECRET not in done.stdout + done.stderr
    assert f'# secret = "***"  (from secret_file {secret_file}; never shown)' in done.stdout.splitlines()
    assert tomllib.loads(done.stdout)["secret_file"] == str(secret_file)


def test_show_says_when_there_is_no_secret(tmp_path: Path) -> None:
    done = caplance("config", "show", write(tmp_path, {**AGENT, "insecure_control": True}), secret=None)
    assert "# secret: none (set CAPLANCE_SECRET or secret_file)" in done.stdout.splitlines()
    assert "insecure control channel" in done.stderr  # warned, at every start and check


@pytest.mark.parametrize(("data", "secret", "expected"), [
    (BALANCER, None, ["@ $.secret_file: control listens on 10.0.0.2:7000, but no secret is set (secret_file or"
                      " CAPLANCE_SECRET): every registration would be refused; set insecure_control = true"
                      " to run like this anyway"]),
    (AGENT, None, ["@ $.secret_file: the agent registers with a balancer, but no secret is set (secret_file or"
                   " CAPLANCE_SECRET): every registration would be refused; set insecure_control = true to"
                   " run like this anyway"]),
    (BALANCER, "fifteen bytes!!", ["@ $.secret_file: the secret is 15 bytes; at least 16 are needed (e.g."
                                   " `openssl rand -hex 32`); set insecure_control = true to run like this"
                                   " anyway"]),
    ({key: value for key, value in BALANCER.items() if key != "allowed_networks"}, SECRET,
     ["@ $.allowed_networks: control listens on 10.0.0.2, not on loopback, and allowed_networks is empty:"
      " anyone who can reach it may try to register; list the agents' networks; set insecure_control ="
      " true to run like this anyway"]),
], ids=["balancer-no-secret", "agent-no-secret", "short-secret", "public-without-networks"])
def test_an_unsafe_control_channel_is_a_config_error(tmp_path: Path, data: dict[str, Any], secret: str | None,
                                                     expected: list[str]) -> None:
    path = write(tmp_path, data)
    assert_invalid(caplance("config", "check", path, secret=secret), path, expected)
    done = caplance("config", "check", write(tmp_path, {**data, "insecure_control": True}, "insecure.toml"),
                    secret=secret)
    assert done.returncode == 0, done.stderr
    assert "insecure control channel" in done.stderr


def test_a_loopback_control_needs_no_allowed_networks(tmp_path: Path) -> None:
    data = {**{k: v for k, v in BALANCER.items() if k != "allowed_networks"}, "control": "127.0.0.1:7000"}
    done = caplance("config", "check", write(tmp_path, data))
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize(("data", "loader"), [(BALANCER, load_balancer_config), (AGENT, load_agent_config)])
def test_show_output_loads_back_to_the_same_config(tmp_path: Path, data: dict[str, Any], loader: Any) -> None:
    path = write(tmp_path, data)
    env = {"CAPLANCE_HEARTBEAT_TIMEOUT" if data is BALANCER else "CAPLANCE_HEARTBEAT_INTERVAL": "0.5"}
    done = caplance("config", "show", path, env=env)
    assert done.returncode == 0, done.stderr
    again = write(tmp_path, done.stdout, "shown.toml")
    secret = {"CAPLANCE_SECRET": SECRET}
    assert loader(again, secret) == loader(path, {**env, **secret})
    assert loader(again, secret) != loader(path, secret)  # the environment was applied


def test_show_of_a_bad_config_prints_no_config(tmp_path: Path) -> None:
    path = write(tmp_path, BALANCER)
    done = caplance("config", "show", path, env={"CAPLANCE_SECRET": SECRET, "CAPLANCE_VIPS__0__PORTS": "[0]"})
    assert_invalid(done, path, [("@ $.vips[0].ports[0] (from CAPLANCE_VIPS__0__PORTS): expected an int"
                                " from 1 to 65535, got 0")])
    assert SECRET not in done.stderr


def test_the_parser_knows_every_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["config", "show", "x.toml"]).action == "show"
    assert parser.parse_args(["ctl", "drain", "be1", "--timeout", "3"]).timeout == 3.0
    assert parser.parse_args(["agent", "--config", "a.toml"]).command == "agent"


# -- the example plugin, by name from a config file -----------------------------------------


def modulo_config(tmp_path: Path) -> Path:
    return write(tmp_path, {
        "control_socket": str(tmp_path / "ctl.sock"),
        "drain_idle": 0.01,  # stop() returns after 10 ms without packets
        "vips": [{"address": "10.99.0.1", "ports": [80], "selector": {"name": "modulo", "options": {"seed": 7}},
                  "backends": [{"name": f"be{n}", "address": f"10.0.0.1{n}", "weight": n} for n in (1, 2, 3)]}],
    })


def test_check_accepts_the_example_plugin_by_name(tmp_path: Path, example_plugin: Any) -> None:  # noqa: F811
    path = modulo_config(tmp_path)
    done = caplance("config", "check", path)
    assert (done.returncode, done.stdout) == (0, f"{path}: valid balancer configuration\n")
    done = caplance("config", "check", path, env={"CAPLANCE_VIPS__0__SELECTOR__OPTIONS__SEED": "-1"})
    assert problem_lines(done) == [("@ $.vips[0].selector: caplance.selectors plugin 'modulo':"
                                   " modulo: seed must be in 0..2**32-1, got -1")]


async def test_a_balancer_from_the_file_forwards_by_the_example_plugin(
        tmp_path: Path, example_plugin: Any) -> None:  # noqa: F811
    config = load_checked(str(modulo_config(tmp_path)), BalancerConfig)
    assert isinstance(config, BalancerConfig)
    listener, transport = MemoryListener(), RecordingTransport()
    balancer = Balancer(config, listener=listener, transports={"udp": transport})
    packets = [ipv4(f"192.0.2.{n % 200 + 1}", "10.99.0.1", 6, tcp(10000 + n, 80)) for n in range(600)]
    reference = example_plugin.build({"be1": 1, "be2": 2, "be3": 3}, seed=7)
    other_seed = example_plugin.build({"be1": 1, "be2": 2, "be3": 3}, seed=8)
    addresses = {ipaddress.ip_address(f"10.0.0.1{n}"): f"be{n}" for n in (1, 2, 3)}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(balancer.run)
            for one in packets:
                listener.source.push(one)
            await trio.testing.wait_all_tasks_blocked()
            balancer.stop()
    assert [packet for _, packet in transport.sent] == packets
    chosen = [addresses[address] for address, _ in transport.sent]
    assert chosen == [reference.select(flow_key(packet)) for packet in packets]
    assert chosen != [other_seed.select(flow_key(packet)) for packet in packets]  # the options reached it
    assert set(chosen) == {"be1", "be2", "be3"}
    assert balancer.snapshot()["forwarded"] == {name: chosen.count(name) for name in ("be1", "be2", "be3")}



# -- no configuration makes the CLI crash -----------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.configs import any_balancer_configs  # noqa: E402


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=any_balancer_configs)
def test_config_check_of_any_config_exits_0_or_2_without_a_traceback(tmp_path: Path, data: dict[str, Any],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from caplance.cli import main

    path = write(tmp_path, data)
    code = main(["config", "check", str(path)])  # an exception escaping main fails the test
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 0:
        assert out == f"{path}: valid balancer configuration\n"
    else:
        assert err.startswith(f"caplance: invalid configuration {path}:")


def test_packet_without_an_interface_fails_the_check(tmp_path: Path) -> None:
    path = write(tmp_path, {**BALANCER, "listener": {"kind": "packet"}})
    done = caplance("config", "check", path)
    assert_invalid(done, path, ["@ $.listener: listener 'packet' needs an interface: the Ethernet interface"
                                " clients' packets arrive on (interface = \"eth0\", say)"])


def test_an_unknown_listener_fails_the_check(tmp_path: Path) -> None:
    path = write(tmp_path, {**BALANCER, "listener": {"kind": "carrier-pigeon"}})
    done = caplance("config", "check", path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert problem_lines(done)[0].startswith("@ $.listener: caplance.listeners plugin 'carrier-pigeon':"
                                             " not registered (available: nfqueue, packet, raw, tun")


def test_a_table_less_selector_with_an_explicit_kernel_data_plane_fails_the_check(tmp_path: Path) -> None:
    data = {**BALANCER, "fastpath": {"mode": "tc"}}
    path = write(tmp_path, data)
    done = caplance("config", "check", path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert problem_lines(done) == ["@ $.vips[1].selector: selector 'ring' has no lookup table, which the kernel"
                                   " data plane (fastpath mode 'tc') needs: use maglev or rendezvous, or"
                                   " fastpath mode 'auto' (its VIP then stays in Python)"]
    auto = write(tmp_path, {**BALANCER, "fastpath": {"mode": "auto"}}, "auto.toml")
    assert caplance("config", "check", auto).returncode == 0


def test_tc_with_the_packet_listener_fails_the_check(tmp_path: Path) -> None:
    path = write(tmp_path, {**BALANCER, "listener": {"kind": "packet", "interface": "eth0"},
                            "fastpath": {"mode": "tc"}})
    done = caplance("config", "check", path)
    assert done.returncode == 2
    assert problem_lines(done)[0].startswith("@ $: fastpath mode 'tc' cannot work with listener 'packet'")


@pytest.mark.parametrize(("announce", "problem"), [
    ({"kind": "exabgp", "options": {"local_as": 65002}}, "missing 1 required keyword-only argument: 'peers'"),
    ({"kind": "exabgp", "options": {"local_as": 0, "peers": [{"address": "10.0.0.1", "as": 65001}],
                                    "router_id": "10.0.0.2"}}, "local_as must be an AS number"),
    ({"kind": "exabgp", "options": {"local_as": 65002, "peers": [{"address": "nowhere", "as": 65001}]}},
     "peers[0].address must be an IP address"),
    ({"kind": "bird", "options": {}}, "missing 1 required keyword-only argument: 'socket'"),
    ({"kind": "bird", "options": {"socket": "/run/bird.ctl", "table": 999}}, "table must be a routing table"),
    ({"kind": "carrier-pigeon"}, "not registered"),
])
def test_a_bad_announce_table_fails_the_check(tmp_path: Path, announce: dict[str, Any], problem: str) -> None:
    path = write(tmp_path, {**BALANCER, "announce": announce})
    done = caplance("config", "check", path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = problem_lines(done)
    assert len(lines) == 1 and lines[0].startswith("@ $.announce: caplance.announcers plugin") and problem in lines[0], lines
