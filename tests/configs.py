"""Hypothesis strategies for balancer configurations as a user might write them: mostly
plausible, often wrong (unknown plugins, bad options, missing keys, odd weights and sizes)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

LISTENERS = st.sampled_from([
    {"kind": "tun"}, {"kind": "raw"}, {"kind": "packet"}, {"kind": "packet", "interface": "eth0"},
    {"kind": "packet", "interface": "lo"}, {"kind": "nfqueue", "options": {"queue": 9}},
    {"kind": "nfqueue", "options": {"queue": -1}}, {"kind": "carrier-pigeon"},
    {"kind": "tun", "device": "a-very-long-device-name"}, {"kind": "raw", "interface": "nosuch0"},
])
SELECTORS = st.one_of(
    st.sampled_from(["maglev", "ring", "rendezvous", "modulo-nope"]).map(lambda n: {"name": n}),
    st.builds(lambda n, size: {"name": n, "options": {"table_size": size}},
              st.sampled_from(["maglev", "rendezvous"]),
              st.sampled_from([2, 4, 1009, 65537, 1000003, 1000000007, 2**40 + 15, 0, -3])),
    st.builds(lambda v: {"name": "ring", "options": {"vnodes": v}}, st.sampled_from([1, 10**9, 0, "x"])),
)
TRANSPORTS = st.sampled_from([
    {"name": "udp"}, {"name": "udp", "options": {"port": 7002}}, {"name": "gue"}, {"name": "gre-raw"},
    {"name": "gre"}, {"name": "udp", "options": {"port": 0}}, {"name": "pigeon"},
])
ADDRESSES = st.sampled_from(["10.99.0.1", "10.99.0.2", "fd99::1", "10.0.0.11", "not-an-address", "0.0.0.0"])


@st.composite
def backends(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(0, 4))
    return [{"name": f"be{index}", "address": draw(st.sampled_from(["10.0.0.11", "10.0.0.12", "fd00::11"])),
             "weight": draw(st.sampled_from([0, 1, 2, 65535, 65536, -1])),
             "transport": draw(TRANSPORTS)} for index in range(count)]


@st.composite
def balancer_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A balancer config as TOML-able data."""
    vips = []
    for address in draw(st.lists(ADDRESSES, min_size=0, max_size=2)):
        vip: dict[str, Any] = {"address": address, "backends": draw(backends())}
        if draw(st.booleans()):
            vip["selector"] = draw(SELECTORS)
        if draw(st.booleans()):
            vip["protocol"] = draw(st.sampled_from(["tcp", "udp", "any", "sctp"]))
        if draw(st.booleans()):
            vip["ports"] = draw(st.lists(st.sampled_from([80, 443, 0, 70000]), max_size=2))
        vips.append(vip)
    config: dict[str, Any] = {"vips": vips, "listener": draw(LISTENERS), "drain_idle": 0.2, "drain_timeout": 1.0}
    if draw(st.booleans()):
        config["workers"] = draw(st.sampled_from([1, 2, "auto", 0, "many"]))
    if draw(st.booleans()):
        config["conntrack"] = {"enabled": draw(st.booleans()), "max_flows": draw(st.sampled_from([8, 1, 1000]))}
    if draw(st.booleans()):
        config["metrics"] = draw(st.sampled_from(["127.0.0.1:0", "127.0.0.1:9100", "nonsense"]))
    return config


@st.composite
def plausible_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Configurations that are valid, or nearly: what a careful user writes."""
    listener = draw(st.sampled_from([{"kind": "tun"}, {"kind": "raw"}, {"kind": "packet", "interface": "eth0"},
                                     {"kind": "nfqueue", "options": {"queue": 11}}]))
    vips = [{"address": address, "protocol": draw(st.sampled_from(["tcp", "udp", "any"])),
             "selector": {"name": draw(st.sampled_from(["maglev", "ring", "rendezvous"]))},
             "backends": [{"name": f"be{n}", "address": f"10.77.0.1{n}", "weight": draw(st.integers(0, 3)),
                           "transport": {"name": draw(st.sampled_from(["udp", "gue", "gre-raw", "gre"]))}}
                          for n in range(1, draw(st.integers(0, 3)) + 1)]}
            for address in draw(st.sampled_from([["10.99.0.1"], ["10.99.0.1", "fd99::1"], ["fd99::1"]]))]
    return {"vips": vips, "listener": listener, "drain_idle": 0.2, "drain_timeout": 1.0,
            "workers": draw(st.sampled_from([1, 2]))}


any_balancer_configs = st.one_of(plausible_configs(), plausible_configs(), balancer_configs())
