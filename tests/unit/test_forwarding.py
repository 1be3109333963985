"""The flow hash (defined once, with vectors), selectors' lookup tables, and the forwarding
table the control plane publishes: pure values, no I/O."""

from __future__ import annotations

import ipaddress
import pickle

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caplance import flowhash
from caplance.config import PluginConfig
from caplance.dataplane.stats import merge
from caplance.forwarding import (
    BackendEntry,
    BackendIds,
    ForwardingTable,
    LookupTable,
    SelectorChoice,
    TableLog,
    VipEntry,
    VipFlags,
)
from caplance.strategies.maglev import Maglev
from caplance.strategies.rendezvous import Rendezvous
from caplance.strategies.ring import Ring
from caplance.testing import flow_keys

VIP = ipaddress.ip_address("10.99.0.1")
VIP6 = ipaddress.ip_address("fd99::1")


# -- the flow hash -----------------------------------------------------------------------


@pytest.mark.parametrize(("key", "seed", "expected"), flowhash.TEST_VECTORS)
def test_the_vectors_hold_for_both_implementations(key: str, seed: int, expected: int) -> None:
    data = bytes.fromhex(key)
    assert flowhash.murmur3_32(data, seed) == expected
    assert flowhash.flow_hash(data, seed) == expected


@given(data=st.binary(max_size=64), seed=st.integers(0, 2**32 - 1))
def test_the_written_definition_is_the_fast_one(data: bytes, seed: int) -> None:
    assert flowhash.murmur3_32(data, seed) == mmh3.hash(data, seed, False)


def test_the_vectors_cover_both_key_lengths_and_every_seed() -> None:
    lengths = {len(bytes.fromhex(key)) for key, _, _ in flowhash.TEST_VECTORS}
    seeds = {seed for _, seed, _ in flowhash.TEST_VECTORS}
    assert {13, 37} <= lengths
    assert {flowhash.MAGLEV_SEED, flowhash.RENDEZVOUS_SEED, flowhash.SOURCE_PORT_SEED} <= seeds


@given(key=st.binary(min_size=13, max_size=13))
def test_source_ports_are_ephemeral(key: bytes) -> None:
    assert 49152 <= flowhash.source_port(key) <= 65535


# -- lookup tables -----------------------------------------------------------------------

weights = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3), st.integers(0, 5), min_size=1, max_size=12)


def ids_for(backends: dict[str, int]) -> dict[str, int]:
    return {name: number for number, name in enumerate(sorted(backends), start=1)}


@settings(deadline=None, max_examples=40)
@given(backends=weights, size=st.sampled_from([1009, 2003]), seed=st.integers(0, 10**6))
@pytest.mark.parametrize("cls", [Maglev, Rendezvous])
def test_the_lookup_table_is_select_for_every_key(cls: type, backends: dict[str, int], size: int,
                                                 seed: int) -> None:
    if cls is Maglev and size < 100 * len(backends):
        size = 2003
    selector = cls.build(backends, table_size=size)  # type: ignore[attr-defined]
    ids = ids_for(backends)
    table = selector.lookup_table(ids)
    assert table.size == size
    for key in flow_keys(300, seed=seed, ipv6=True):
        chosen = selector.select(key)
        assert table.entry(key) == (0 if chosen is None else ids[chosen])


@pytest.mark.parametrize("cls", [Maglev, Rendezvous])
def test_every_slot_is_the_select_of_a_key_that_lands_there(cls: type) -> None:
    """The table's slots are exactly the selector's own, found by hashing to them."""
    selector = cls.build({"a": 1, "b": 2, "c": 1})  # type: ignore[attr-defined]
    ids = {"a": 7, "b": 8, "c": 9}
    table = selector.lookup_table(ids)
    slots = table.slots()
    names = {7: "a", 8: "b", 9: "c"}
    for key in flow_keys(2000, seed=3):
        slot = flowhash.flow_hash(key, table.seed) % table.size
        assert names[slots[slot]] == selector.select(key)


def test_a_lookup_table_needs_every_id() -> None:
    with pytest.raises(ValueError, match="no backend id given for 'b'"):
        Maglev.build({"a": 1, "b": 1}).lookup_table({"a": 1})


def test_a_ring_has_no_lookup_table_but_a_choice_by_name() -> None:
    ring = Ring.build({"a": 1, "b": 1})
    assert not hasattr(ring, "lookup_table")
    choice = SelectorChoice(selector=ring, ids={"a": 1, "b": 2})
    for key in flow_keys(200):
        assert choice.entry(key) == {"a": 1, "b": 2}[ring.select(key)]  # type: ignore[index]


def test_lookup_tables_refuse_bad_layouts() -> None:
    with pytest.raises(ValueError):
        LookupTable(seed=1, ids=b"\x00\x00\x00")
    with pytest.raises(ValueError):
        LookupTable(seed=1, ids=b"\x00" * 4, function="crc32")
    assert LookupTable.from_ids(5, [0, 1, 2]).slots().tolist() == [0, 1, 2]


# -- the forwarding table ----------------------------------------------------------------


def backend(number: int, name: str, address: str = "10.0.0.1") -> BackendEntry:
    return BackendEntry(id=number, name=name, address=ipaddress.ip_address(address),
                        transport=PluginConfig(name="udp"), max_packet=1472)


def vip(address: ipaddress.IPv4Address | ipaddress.IPv6Address, choice: LookupTable, members: set[int],
        flags: VipFlags = VipFlags.NONE) -> VipEntry:
    return VipEntry(address=address, protocol="tcp", ports=frozenset({80}), selector="maglev", choice=choice,
                    members=members, flags=flags)


def table_one() -> ForwardingTable:
    lookup = Maglev.build({"a": 1, "b": 1}).lookup_table({"a": 1, "b": 2})
    return ForwardingTable(version=1, vips={VIP: vip(VIP, lookup, {1, 2})},
                           backends={1: backend(1, "a"), 2: backend(2, "b", "10.0.0.2")})


def test_changes_since_carry_only_what_changed_and_apply_back() -> None:
    one = table_one()
    lookup = Maglev.build({"a": 1}).lookup_table({"a": 1})
    two = ForwardingTable(version=2, vips={VIP: vip(VIP, lookup, {1}), VIP6: vip(VIP6, lookup, {1})},
                          backends={1: one.backends[1]})
    changes = two.changes_since(one)
    assert set(changes.vips) == {VIP, VIP6} and changes.backends == {2: None}
    assert one.apply(changes) == two
    assert two.changes_since(two).vips == {} and two.changes_since(two).backends == {}
    with pytest.raises(ValueError, match="changes for version 1 applied to version 2"):
        two.apply(changes)


def test_tables_pickle_for_worker_processes() -> None:
    one = table_one()
    assert pickle.loads(pickle.dumps(one)) == one


def test_a_backend_id_must_match_its_key_and_range() -> None:
    with pytest.raises(ValueError):
        ForwardingTable(version=1, backends={3: backend(1, "a")})
    with pytest.raises(ValueError):
        ForwardingTable(version=1, backends={0: backend(0, "a")})


def test_flags_and_protocols() -> None:
    closed = table_one().with_flags(VipFlags.CLOSED, version=2)
    assert closed.version == 2 and closed.vips[VIP].flags is VipFlags.CLOSED
    assert closed.vips[VIP].protocols == frozenset({6, 1, 58})
    assert closed.backend_named("b") == closed.backends[2]


def test_the_log_answers_by_version_and_forgets_old_ones() -> None:
    log = TableLog(keep=2)
    one = table_one()
    log.publish(one)
    two = one.with_flags(VipFlags.CLOSED, version=2)
    log.publish(two)
    assert log.changes_since(1) == two.changes_since(one)
    log.publish(two.with_flags(VipFlags.NONE, version=3))
    assert log.changes_since(1) is None  # too old: take the latest whole
    assert log.latest.version == 3
    with pytest.raises(ValueError):
        log.publish(one)


def test_backend_ids_are_small_stable_and_reused_late() -> None:
    ids = BackendIds(limit=3)
    assert [ids.hold(n) for n in ("a", "b", "a")] == [1, 2, 1]
    ids.release("a")
    assert ids.hold("c") == 3  # not 1: a freed id waits its turn
    assert ids.hold("d") == 1
    with pytest.raises(ValueError, match="all 3 backend ids"):
        ids.hold("e")
    assert ids.names() == ["b", "c", "d"]


# -- stats snapshots ---------------------------------------------------------------------


def test_snapshots_merge_key_by_key() -> None:
    one = {"packets_in": 3, "dropped": {"x": 1}, "conntrack": None, "kind": "python"}
    two = {"packets_in": 4, "dropped": {"x": 2, "y": 1}, "conntrack": {"size": 5}, "kind": "other"}
    assert merge([one, two]) == {"packets_in": 7, "dropped": {"x": 3, "y": 1}, "conntrack": {"size": 5},
                                 "kind": "python"}
    assert merge([]) == {}
