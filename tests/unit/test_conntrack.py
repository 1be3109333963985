"""The flow table: bounded, LRU per segment, idle timeouts, SYN floods kept apart."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caplance.conntrack import FlowTable

SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def table(max_flows: int = 100) -> FlowTable:
    return FlowTable(max_flows=max_flows, tcp_timeout=900, closing_timeout=10, other_timeout=30)


def key(n: int) -> bytes:
    return n.to_bytes(13, "big")


def establish(flows: FlowTable, n: int, backend: str = "a", now: float = 0) -> None:
    assert flows.lookup(key(n), SYN, now) is None
    flows.insert(key(n), backend, now)
    assert flows.lookup(key(n), ACK, now) == backend  # promoted


def test_hits_follow_the_remembered_backend() -> None:
    flows = table()
    establish(flows, 1, "be1")
    assert flows.lookup(key(1), ACK, 5) == "be1"
    assert flows.lookup(key(2), ACK, 5) is None
    snap = flows.snapshot()
    assert snap["segments"] == {"new": 0, "tcp": 1, "other": 0, "closing": 0}
    assert (snap["hits"], snap["misses"]) == (2, 2)


def test_a_syn_flood_never_evicts_established_flows() -> None:
    flows = table(100)  # new segment: 25, established: 75
    for n in range(50):
        establish(flows, n)
    for n in range(1000, 11000):  # random sources, one SYN each
        if flows.lookup(key(n), SYN, 1) is None:
            flows.insert(key(n), "b", 1)
    assert all(flows.lookup(key(n), ACK, 2) == "a" for n in range(50))
    assert flows.counters.evictions["new"] == 10000 - 25
    assert flows.counters.evictions["established"] == 0
    assert len(flows) <= 100


def test_when_full_the_least_recently_used_established_flow_goes() -> None:
    flows = table(8)  # established capacity 6
    for n in range(6):
        establish(flows, n, now=n)
    flows.lookup(key(0), ACK, 10)  # flow 0 is now the most recent
    establish(flows, 99, now=11)
    assert flows.lookup(key(1), ACK, 12) is None  # the LRU one was evicted
    assert flows.lookup(key(0), ACK, 12) == "a"
    assert flows.counters.evictions["established"] == 1


def test_idle_timeouts_per_segment_and_fin_shortening() -> None:
    flows = table()
    establish(flows, 1, now=0)  # tcp: 900 s
    establish(flows, 2, now=0)
    assert flows.lookup(key(2), FIN | ACK, 0) == "a"  # closing: 10 s
    assert flows.lookup(key(3), None, 0) is None
    flows.insert(key(3), "a", 0)
    flows.lookup(key(3), None, 0)  # other: 30 s
    flows.expire(9.9)
    assert len(flows) == 3
    flows.expire(10.1)
    assert flows.lookup(key(2), ACK, 10.2) is None
    flows.expire(31)
    assert flows.lookup(key(3), None, 31) is None
    assert flows.lookup(key(1), ACK, 899) == "a"  # refreshed at 899...
    flows.expire(1798)
    assert flows.lookup(key(1), ACK, 1798) == "a"  # ...so alive at 1798
    flows.expire(2700)
    assert len(flows) == 0
    assert flows.counters.expirations == {"closing": 1, "other": 1, "tcp": 1}


def test_a_syn_on_a_closed_flow_is_a_new_connection() -> None:
    flows = table()
    establish(flows, 1, "old")
    flows.lookup(key(1), FIN | ACK, 1)
    assert flows.lookup(key(1), SYN, 2) is None  # ports reused: choose again
    assert flows.counters.expirations["reused"] == 1
    flows.insert(key(2), "x", 3)
    assert flows.lookup(key(2), SYN, 3) == "x"  # a SYN on a new flow: a retransmission
    assert flows.lookup(key(2), ACK, 4) == "x"
    assert flows.lookup(key(2), SYN, 5) is None  # on an established one: ports reused


def test_reassign_points_a_flow_at_a_new_backend() -> None:
    flows = table()
    establish(flows, 1, "dead")
    flows.reassign(key(1), "alive")
    assert flows.lookup(key(1), ACK, 1) == "alive"
    assert flows.counters.expirations["backend_gone"] == 1


def test_tiny_tables_are_refused() -> None:
    with pytest.raises(ValueError):
        table(3)


operations = st.lists(st.tuples(
    st.sampled_from(["lookup", "insert", "expire"]),
    st.integers(0, 60),  # flow
    st.sampled_from([None, SYN, ACK, FIN | ACK, RST]),
    st.floats(0, 2000),
), max_size=300)


@settings(max_examples=300)
@given(st.integers(8, 40), operations)
def test_the_table_never_exceeds_its_bound(bound: int, ops: list[tuple[str, int, int | None, float]]) -> None:
    flows = table(bound)
    now = 0.0
    for op, n, flags, step in ops:
        now += step / 100
        if op == "lookup":
            flows.lookup(key(n), flags, now)
        elif op == "insert" and flows.lookup(key(n), flags, now) is None:
            flows.insert(key(n), "a", now)
        elif op == "expire":
            flows.expire(now)
        assert len(flows) <= bound
        assert len(flows.segments[0]) <= bound // 4
