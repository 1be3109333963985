"""Configuration: validation with paths, CAPLANCE_* overrides, secrets, round trips.

Pure: no sockets, no root. The command line around it is tested in ``test_cli.py``.
"""

from __future__ import annotations

import ipaddress
import string
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from caplance.config import (
    SECRET_ENV,
    AgentConfig,
    BackendConfig,
    BalancerConfig,
    AnnounceConfig,
    ConntrackConfig,
    DecapConfig,
    Endpoint,
    FastpathConfig,
    HealthCheckConfig,
    ListenerConfig,
    LocalCheckConfig,
    PluginConfig,
    Secret,
    VipConfig,
    structure,
    unstructure,
)
from caplance.configfile import apply_environment, load_agent_config, load_balancer_config
from caplance.errors import ConfigError

MINIMAL: dict[str, Any] = {"vips": [{"address": "10.99.0.1", "ports": [80],
                                     "backends": [{"name": "be1", "address": "10.0.0.11"}]}]}


def problems(raised: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(raised.value.problems)


def env(data: dict[str, Any], **variables: str) -> tuple[dict[str, Any], dict[str, str]]:
    return apply_environment(data, variables, cls=BalancerConfig)


# -- validation: every problem, with its path and value ------------------------------------


def test_every_problem_is_listed_with_its_path_and_value() -> None:
    data = {
        "vips": [{"address": "10.99.0.1", "ports": [80, "http", 70000],
                  "backends": [{"name": "be1", "address": "nope", "weight": -1, "colour": "red"}]}],
        "listener": {"kind": "packet"},
        "drain_timeout": 0,
        "control": "10.0.0.2",
    }
    with pytest.raises(ConfigError) as raised:
        structure(data, BalancerConfig)
    assert problems(raised) == {
        "$.vips[0].ports[1]": 'expected an int from 1 to 65535, got "http"',
        "$.vips[0].ports[2]": "expected an int from 1 to 65535, got 70000",
        "$.vips[0].backends[0].address": 'expected an IP address, got "nope"',
        "$.vips[0].backends[0].weight": "expected an int from 0 to 65535, got -1",
        "$.vips[0].backends[0]": 'unknown key "colour"',
        "$.listener": "listener 'packet' needs an interface: the Ethernet interface clients' packets arrive"
                      ' on (interface = "eth0", say)',
        "$.drain_timeout": "expected a number of seconds > 0, got 0",
        "$.control": 'expected "address:port" (IPv6: "[address]:port"), got "10.0.0.2"',
    }
    assert str(raised.value).startswith('@ $.vips[0].ports[1]: expected an int from 1 to 65535, got "http"; ')


@pytest.mark.parametrize(("data", "path", "message"), [
    ({}, "$.vips", "required key missing"),
    ({"vips": []}, "$", "a balancer needs at least one VIP"),
    ({"vips": "10.99.0.1"}, "$.vips", 'expected a list, got "10.99.0.1"'),
    ({"vips": ["10.99.0.1"]}, "$.vips[0]", 'expected a table, got "10.99.0.1"'),
    ({"vips": [{}]}, "$.vips[0].address", "required key missing"),
    ({"vips": [{"address": "10.99.0.1"}, {"address": "10.99.0.1"}]}, "$", "each VIP address may appear once"),
    ({"vips": [{"address": "10.99.0.1", "protocol": True}]}, "$.vips[0].protocol",
     'expected one of "tcp", "udp", "any", got true'),
    ({"vips": [{"address": "10.99.0.1", "selector": "maglev"}]}, "$.vips[0].selector",
     'expected a table, got "maglev"'),
    ({"vips": [{"address": "10.99.0.1", "selector": {"name": "maglev", "options": 5}}]},
     "$.vips[0].selector.options", "expected a table of options, got 5"),
    ({"vips": [{"address": "10.99.0.1", "backends": [{"name": "a", "address": "10.0.0.1"},
                                                       {"name": "a", "address": "10.0.0.2"}]}]},
     "$.vips[0]", 'backend names must be unique within a VIP, got ["a", "a"]'),
    ({**MINIMAL, "listener": {"device": "a-name-that-is-too-long"}}, "$.listener.device",
     'expected an interface name of 1 to 15 characters, got "a-name-that-is-too-long"'),
    ({**MINIMAL, "allowed_networks": ["10.0.0.0/33"]}, "$.allowed_networks[0]",
     'expected an IP network such as "10.0.0.0/8", got "10.0.0.0/33"'),
    ({**MINIMAL, "secret": "hunter2"}, "$.secret",
     ("secrets may not be written in a config file; put it in a file named by secret_file,"
     " or in CAPLANCE_SECRET")),
    ({**MINIMAL, "conntrack": {"enabled": "yes"}}, "$.conntrack.enabled", 'expected true or false, got "yes"'),
    ({**MINIMAL, "control_socket": 5}, "$.control_socket", "expected a string, got 5"),
    ({**MINIMAL, "vips": [{"address": "10.99.0.1", "health": {"port": 80, "rise": 0}}]},
     "$.vips[0].health.rise", "expected an int >= 1, got 0"),
])
def test_one_problem(data: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        structure(data, BalancerConfig)
    assert problems(raised) == {path: message}


@pytest.mark.parametrize(("data", "path", "message"), [
    ({"name": "be1"}, "$.vips", "required key missing"),
    ({"name": "", "vips": ["10.99.0.1"]}, "$.name", 'expected a name of 1 to 64 printable characters, got ""'),
    ({"name": "be1", "vips": ["10.99.0.1"], "inject": "carrier"}, "$.inject",
     'expected one of "raw", "tun", got "carrier"'),
    ({"name": "be1", "vips": ["10.99.0.1"], "health": {"command": ["true"], "url": "http://x/"}},
     "$.health", "a local check has exactly one of command or url"),
    ({"name": "be1", "vips": ["10.99.0.1"], "balancer": "[::1]:0"}, "$.balancer",
     'expected "address:port" (IPv6: "[address]:port"), got "[::1]:0"'),
])
def test_one_agent_problem(data: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        structure(data, AgentConfig)
    assert problems(raised) == {path: message}


def test_library_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match="expected an int from 1 to 65535, got 0"):
        VipConfig(address="10.99.0.1", ports=(0,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected an IP address"):
        BackendConfig(name="be1", address="be1.example")  # type: ignore[arg-type]
    vip = VipConfig(address="2001:db8::1")  # type: ignore[arg-type]
    assert vip.address == ipaddress.IPv6Address("2001:db8::1")
    assert vip.selector == PluginConfig(name="maglev")  # type: ignore[arg-type]


def test_endpoints_parse_both_families() -> None:
    assert Endpoint.parse("10.0.0.2:7000") == Endpoint(ipaddress.ip_address("10.0.0.2"), 7000)  # type: ignore[arg-type]
    six = Endpoint.parse("[2001:db8::2]:7000")
    assert (str(six.host), six.port, str(six)) == ("2001:db8::2", 7000, "[2001:db8::2]:7000")
    for bad in ("10.0.0.2", "10.0.0.2:http", "2001:db8::2:7000x", ":7000", 7000):
        with pytest.raises(ValueError, match="address:port"):
            Endpoint.parse(bad)


def test_an_agent_accepts_packets_from_its_balancer_unless_told_otherwise() -> None:
    agent = structure({"name": "be1", "vips": ["10.99.0.1"], "balancer": "10.0.0.2:7000"}, AgentConfig)
    assert agent.allowed_sources == (ipaddress.ip_address("10.0.0.2"),)
    agent = attrs.evolve(agent, balancers=("10.0.0.3", "10.0.0.4"))
    assert agent.allowed_sources == (ipaddress.ip_address("10.0.0.3"), ipaddress.ip_address("10.0.0.4"))


# -- CAPLANCE_* environment overrides -------------------------------------------------------


def test_nested_keys_and_list_items() -> None:
    data, sources = env(MINIMAL, CAPLANCE_LISTENER__KIND="raw", CAPLANCE_LISTENER__INTERFACE="lo",
                        CAPLANCE_VIPS__0__PORTS="[80, 443]",
                        CAPLANCE_VIPS__0__BACKENDS__0__WEIGHT="3",
                        CAPLANCE_DRAIN_TIMEOUT="2.5")
    assert data["listener"] == {"kind": "raw", "interface": "lo", "device": "caplance0", "options": {}}
    assert data["vips"][0]["ports"] == [80, 443]
    assert data["vips"][0]["backends"][0] == {"name": "be1", "address": "10.0.0.11", "weight": 3}
    assert data["drain_timeout"] == 2.5
    assert sources["$.vips[0].ports"] == "CAPLANCE_VIPS__0__PORTS"
    assert sources["$.listener.kind"] == "CAPLANCE_LISTENER__KIND"
    config = structure(data, BalancerConfig)
    assert config.listener.kind == "raw" and config.vips[0].ports == (80, 443)


def test_the_file_data_is_not_changed() -> None:
    before = repr(MINIMAL)
    env(MINIMAL, CAPLANCE_VIPS__0__PORTS="[8080]", CAPLANCE_VIPS__0__BACKENDS__1__NAME="be2",
        CAPLANCE_VIPS__0__BACKENDS__1__ADDRESS="10.0.0.12")
    assert repr(MINIMAL) == before


def test_an_item_one_past_the_end_is_appended() -> None:
    data, sources = env(MINIMAL, CAPLANCE_VIPS__0__BACKENDS__1__NAME="be2",
                        CAPLANCE_VIPS__0__BACKENDS__1__ADDRESS="10.0.0.12",
                        CAPLANCE_VIPS__0__PORTS__1="443")
    assert [b["name"] for b in data["vips"][0]["backends"]] == ["be1", "be2"]
    assert data["vips"][0]["ports"] == [80, 443]
    assert sources["$.vips[0].backends[1]"] == "CAPLANCE_VIPS__0__BACKENDS__1__ADDRESS"  # first, sorted
    config = structure(data, BalancerConfig)
    assert config.vips[0].backends[1].address == ipaddress.ip_address("10.0.0.12")


@pytest.mark.parametrize(("text", "value"), [
    ("5", 5),
    ("2.5", 2.5),
    ("true", True),
    ("[80, 443]", [80, 443]),
    ('"quoted"', "quoted"),
    ("{ seed = 7, name = 'x' }", {"seed": 7, "name": "x"}),
    ("plain text", "plain text"),
    ("10.0.0.1", "10.0.0.1"),
    ("[not toml", "[not toml"),
])
def test_values_are_read_as_toml_or_else_as_text(text: str, value: Any) -> None:
    data, _ = env(MINIMAL, CAPLANCE_VIPS__0__SELECTOR__OPTIONS__X=text)
    assert data["vips"][0]["selector"]["options"]["x"] == value
    assert type(data["vips"][0]["selector"]["options"]["x"]) is type(value)


@pytest.mark.parametrize(("variable", "text", "path", "value"), [
    ("CAPLANCE_LISTENER__DEVICE", "1234", ("listener", "device"), "1234"),
    ("CAPLANCE_VIPS__0__BACKENDS__0__NAME", "42", ("vips", 0, "backends", 0, "name"), "42"),
    ("CAPLANCE_VIPS__0__BACKENDS__0__NAME", '"be-9"', ("vips", 0, "backends", 0, "name"), "be-9"),
    ("CAPLANCE_VIPS__0__PROTOCOL", "udp", ("vips", 0, "protocol"), "udp"),
    ("CAPLANCE_CONTROL_SOCKET", "2024-01-01", ("control_socket",), "2024-01-01"),
])
def test_string_fields_take_the_text(variable: str, text: str, path: tuple[Any, ...], value: str) -> None:
    data, _ = env(MINIMAL, **{variable: text})
    found: Any = data
    for part in path:
        found = found[part]
    assert found == value


def test_a_missing_table_starts_from_the_fields_default() -> None:
    data, _ = env(MINIMAL, CAPLANCE_VIPS__0__BACKENDS__0__TRANSPORT__OPTIONS__PORT="7002")
    assert data["vips"][0]["backends"][0]["transport"] == {"name": "udp", "options": {"port": 7002}}
    agent, _ = apply_environment({"name": "be1", "vips": ["10.99.0.1"]},
                                 {"CAPLANCE_TRANSPORT__OPTIONS__PORT": "7002"}, cls=AgentConfig)
    assert structure(agent, AgentConfig).transport == PluginConfig(name="udp", options={"port": 7002})  # type: ignore[arg-type]
    data, _ = env(MINIMAL, CAPLANCE_VIPS__0__HEALTH__PORT="8080")  # default None: an empty table
    assert data["vips"][0]["health"] == {"port": 8080}


@pytest.mark.parametrize(("variables", "path", "message"), [
    ({"CAPLANCE_LISTENR__KIND": "raw"}, "$ (from CAPLANCE_LISTENR__KIND)",
     ('unknown key "listenr" (keys here: vips, listener, conntrack, control, control_socket,'
     " metrics, secret_file, secret, allowed_networks, insecure_control, heartbeat_timeout, proof_timeout,"
     " drain_timeout, drain_idle, workers, fastpath, announce)")),
    ({"CAPLANCE_LISTENER__KINDX": "raw"}, "$.listener (from CAPLANCE_LISTENER__KINDX)",
     'unknown key "kindx" (keys here: kind, interface, device, options)'),
    ({"CAPLANCE_DRAIN_TIMEOUT__X": "1"}, "$.drain_timeout (from CAPLANCE_DRAIN_TIMEOUT__X)",
     "a single value has no keys or items below it"),
    ({"CAPLANCE_VIPS__FIRST__PORTS": "[1]"}, "$.vips (from CAPLANCE_VIPS__FIRST__PORTS)",
     'a list takes item numbers (0, 1, ...), not "first"'),
    ({"CAPLANCE_VIPS__3__PORTS": "[1]"}, "$.vips[3] (from CAPLANCE_VIPS__3__PORTS)",
     "no list item 3: the list has 1; add items in order (1 next)"),
    ({"CAPLANCE_VIPS__0__PORTS__5": "1"}, "$.vips[0].ports[5] (from CAPLANCE_VIPS__0__PORTS__5)",
     "no list item 5: the list has 1; add items in order (1 next)"),
    ({"CAPLANCE_VIPS____PORTS": "[1]"}, "$ (from CAPLANCE_VIPS____PORTS)",
     "empty path part: use single words joined by __"),
])
def test_paths_that_do_not_fit_are_errors_naming_the_variable(
        variables: dict[str, str], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        env(MINIMAL, **variables)
    assert problems(raised) == {path: message}


def test_a_key_below_a_value_the_file_has_is_an_error() -> None:
    with pytest.raises(ConfigError) as raised:
        env({**MINIMAL, "listener": "tun"}, CAPLANCE_LISTENER__KIND="raw")
    assert problems(raised) == {
        "$.listener.kind (from CAPLANCE_LISTENER__KIND)": 'cannot set "kind" in "tun", which is not a table'}


def test_every_bad_variable_is_listed() -> None:
    with pytest.raises(ConfigError) as raised:
        env(MINIMAL, CAPLANCE_NOPE="1", CAPLANCE_VIPS__9__PORTS="[1]", CAPLANCE_DRAIN_TIMEOUT="3")
    assert [path for path, _ in raised.value.problems] == [
        "$ (from CAPLANCE_NOPE)", "$.vips[9] (from CAPLANCE_VIPS__9__PORTS)"]


def test_other_variables_and_the_secret_are_left_alone() -> None:
    data, sources = apply_environment(MINIMAL, {"HOME": "/root", SECRET_ENV: "hunter2", "XCAPLANCE_DRAIN_TIMEOUT": "1"},
                                      cls=BalancerConfig)
    assert data == MINIMAL and sources == {}


def test_without_a_class_paths_are_not_checked() -> None:
    data, sources = apply_environment({}, {"CAPLANCE_A__B": "1", "CAPLANCE_L__0": "x", "CAPLANCE_L__1": "y"})
    assert data == {"a": {"b": 1}, "l": ["x", "y"]}
    assert sources == {"$.a.b": "CAPLANCE_A__B", "$.l[0]": "CAPLANCE_L__0", "$.l[1]": "CAPLANCE_L__1",
                       "$.a": "CAPLANCE_A__B", "$.l": "CAPLANCE_L__0"}


def test_a_problem_in_a_value_names_the_variable_that_set_it() -> None:
    data, sources = env(MINIMAL, CAPLANCE_VIPS__0__PORTS='["http"]', CAPLANCE_VIPS__1__PORTS="[80]")
    with pytest.raises(ConfigError) as raised:
        structure(data, BalancerConfig, sources=sources)
    assert problems(raised) == {
        "$.vips[0].ports[0] (from CAPLANCE_VIPS__0__PORTS)": 'expected an int from 1 to 65535, got "http"',
        # vips[1] was made by the variable: what it lacks is blamed on it
        "$.vips[1].address (from CAPLANCE_VIPS__1__PORTS)": "required key missing",
    }


# -- files and secrets ----------------------------------------------------------------------


def write(tmp_path: Path, data: dict[str, Any], name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(tomli_w.dumps(data))
    return path


def test_load_applies_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    config = load_balancer_config(path, {"CAPLANCE_VIPS__0__PORTS": "[8080]"})
    assert config.vips[0].ports == (8080,)
    assert config.secret is None


def test_the_secret_comes_from_the_environment_first_then_the_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-the-file\n")
    path = write(tmp_path, {**MINIMAL, "secret_file": str(secret_file)})
    assert load_balancer_config(path, {}).secret == Secret(b"from-the-file")
    assert load_balancer_config(path, {SECRET_ENV: "hunter2"}).secret == Secret(b"hunter2")
    agent = write(tmp_path, {"name": "be1", "vips": ["10.99.0.1"]}, "agent.toml")
    assert load_agent_config(agent, {SECRET_ENV: "hunter2"}).secret == Secret(b"hunter2")
    assert load_agent_config(agent, {"CAPLANCE_SECRET_FILE": str(secret_file)}).secret == Secret(b"from-the-file")


def test_the_secret_is_never_shown() -> None:
    config = structure(MINIMAL, BalancerConfig)
    config = attrs.evolve(config, secret=Secret(b"hunter2"))
    assert "hunter2" not in repr(config) and "hunter2" not in str(config.secret)
    assert unstructure(config)["secret"] == "***"
    assert "hunter2" not in tomli_w.dumps(unstructure(config))


@pytest.mark.parametrize(("content", "message"), [(None, "cannot read"), ("  \n", "is empty")])
def test_a_bad_secret_file_is_a_config_error(tmp_path: Path, content: str | None, message: str) -> None:
    secret_file = tmp_path / "secret"
    if content is not None:
        secret_file.write_text(content)
    path = write(tmp_path, {**MINIMAL, "secret_file": str(secret_file)})
    with pytest.raises(ConfigError) as raised:
        load_balancer_config(path, {})
    assert list(problems(raised)) == ["$.secret_file"]
    assert message in problems(raised)["$.secret_file"]


def test_unreadable_or_invalid_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"@ \$: cannot read .*missing.toml: No such file"):
        load_balancer_config(tmp_path / "missing.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("vips = [\n")
    with pytest.raises(ConfigError, match=r"@ \$: .*bad.toml is not valid TOML"):
        load_balancer_config(bad, {})


# -- round trips ----------------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1,
                max_size=64).filter(str.isprintable)
ifnames = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=15)
addresses = st.ip_addresses()
ports = st.integers(1, 65535)
seconds = st.floats(min_value=0.001, max_value=1e6, allow_nan=False)
counts = st.integers(1, 2**40)
endpoints = st.builds(Endpoint, addresses, ports)
networks = st.one_of(
    st.builds(lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False), st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False), st.ip_addresses(v=6), st.integers(0, 128)),
)
toml_values = st.recursive(
    st.one_of(st.integers(-2**63, 2**63 - 1), st.booleans(), st.text(max_size=10),
              st.floats(allow_nan=False)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=5), inner, max_size=3),
    max_leaves=6,
)
options = st.dictionaries(st.text(min_size=1, max_size=10), toml_values, max_size=3)
plugins = st.builds(PluginConfig, name=names, options=options)

#: A strategy for every field of every config class: a new field without one fails
#: test_the_strategies_cover_every_field, so the round trips keep covering everything.
FIELDS: dict[type, dict[str, st.SearchStrategy[Any]]] = {
    PluginConfig: {"name": names, "options": options},
    BackendConfig: {"name": names, "address": addresses, "weight": st.integers(0, 1000), "transport": plugins,
                    "decap": st.sampled_from(["agent", "kernel"])},
    HealthCheckConfig: {"kind": st.sampled_from(["tcp", "http"]), "port": ports, "path": st.text(max_size=20),
                        "interval": seconds, "timeout": seconds, "rise": counts, "fall": counts},
    ListenerConfig: {"kind": st.sampled_from(["tun", "raw", "nfqueue"]), "interface": st.none() | ifnames,
                     "device": ifnames, "options": options},
    AnnounceConfig: {"kind": st.sampled_from(["none", "exabgp", "bird"]), "min_backends": counts,
                     "withdraw_grace": seconds, "settle": seconds, "options": options},
    FastpathConfig: {"mode": st.sampled_from(["auto", "tc", "xdp", "off"]), "interface": st.none() | ifnames,
                     "new_flows_per_second": counts},
    DecapConfig: {"mode": st.sampled_from(["auto", "tc", "off"]), "interface": st.none() | ifnames},
    ConntrackConfig: {"enabled": st.booleans(), "max_flows": counts, "tcp_timeout": seconds,
                      "tcp_closing_timeout": seconds, "udp_timeout": seconds},
    LocalCheckConfig: {"command": st.just(()), "url": st.none(), "interval": seconds, "timeout": seconds},
}


def builds(cls: type, **overrides: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.builds(cls, **{**FIELDS[cls], **overrides})


FIELDS[VipConfig] = {
    "address": addresses, "protocol": st.sampled_from(["tcp", "udp", "any"]),
    "ports": st.lists(ports, max_size=4).map(tuple), "selector": plugins,
    "backends": st.lists(builds(BackendConfig), max_size=3, unique_by=lambda b: b.name).map(tuple),
    "health": st.none() | builds(HealthCheckConfig),
}
FIELDS[BalancerConfig] = {
    "vips": st.lists(builds(VipConfig), min_size=1, max_size=3, unique_by=lambda v: v.address).map(tuple),
    "listener": builds(ListenerConfig), "conntrack": builds(ConntrackConfig),
    "control": st.none() | endpoints, "control_socket": st.text(min_size=1, max_size=30),
    "metrics": st.none() | endpoints, "secret_file": st.none() | st.text(min_size=1, max_size=30),
    "secret": st.none(), "allowed_networks": st.lists(networks, max_size=3).map(tuple),
    "insecure_control": st.booleans(),
    "heartbeat_timeout": seconds, "proof_timeout": seconds, "drain_timeout": seconds, "drain_idle": seconds,
    "workers": st.just("auto") | st.integers(1, 64),
    "fastpath": builds(FastpathConfig, mode=st.sampled_from(["auto", "xdp", "off"])),
    "announce": builds(AnnounceConfig),
}
local_checks = st.one_of(
    builds(LocalCheckConfig, command=st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3).map(tuple)),
    builds(LocalCheckConfig, url=st.builds("http://{}:{}/{}".format, st.sampled_from(["127.0.0.1", "localhost"]),
                                           st.integers(1, 65535), st.text("abc/", max_size=8))),
)
FIELDS[AgentConfig] = {
    "name": names, "vips": st.lists(addresses, min_size=1, max_size=3).map(tuple),
    "balancer": st.none() | endpoints, "register_with": st.lists(endpoints, max_size=2).map(tuple), "data_address": addresses, "weight": st.integers(0, 1000),
    "transport": plugins, "balancers": st.lists(addresses, max_size=2).map(tuple),
    "inject": st.sampled_from(["raw", "tun"]), "vip_interface": ifnames, "tun_device": ifnames,
    "tun_address": addresses, "secret_file": st.none() | st.text(min_size=1, max_size=30), "secret": st.none(),
    "insecure_control": st.booleans(), "heartbeat_interval": seconds, "drain_timeout": seconds, "health": st.none() | local_checks,
    "fastpath": builds(DecapConfig),
}


@pytest.mark.parametrize("cls", sorted(FIELDS, key=lambda c: c.__name__))
def test_the_strategies_cover_every_field(cls: type) -> None:
    assert set(FIELDS[cls]) == set(attrs.fields_dict(cls))


@settings(deadline=None, max_examples=150)
@given(config=builds(BalancerConfig))
def test_balancer_config_round_trips(config: BalancerConfig) -> None:
    assert structure(unstructure(config), BalancerConfig) == config
    text = tomli_w.dumps(unstructure(config))
    assert structure(tomllib.loads(text), BalancerConfig) == config


@settings(deadline=None, max_examples=150)
@given(config=builds(AgentConfig))
def test_agent_config_round_trips(config: AgentConfig) -> None:
    assert structure(unstructure(config), AgentConfig) == config
    text = tomli_w.dumps(unstructure(config))
    assert structure(tomllib.loads(text), AgentConfig) == config


@settings(deadline=None)
@given(config=builds(BalancerConfig))
def test_unstructured_data_is_plain(config: BalancerConfig) -> None:
    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return isinstance(value, (str, int, float, bool))

    assert plain(unstructure(config))
