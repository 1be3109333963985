"""What ``caplance ctl status`` prints and what ``/metrics`` renders, from one status value."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from caplance.control.ctl import format_status
from caplance.control.metrics import StatusCollector, render


def status(**backend: Any) -> dict[str, Any]:
    row = {"backend": "be1", "address": "10.0.0.11", "vips": ["10.99.0.1"], "state": "active", "weight": 2,
           "effective_weight": 2, "health": "ok", "packets": 5, "bytes": 500, "last_heartbeat": 0.4,
           "static": False, **backend}
    return {
        "backends": [row],
        "counters": {"packets_in": 7, "forwarded": {"be1": 5}, "forwarded_bytes": {"be1": 500},
                     "dropped": {"not_a_vip": 2}, "icmp_too_big": 0},
        "control": {"registrations": 1},
        "conntrack": {"size": 3, "max_flows": 10, "segments": {"new": 1, "tcp": 2, "other": 0, "closing": 0},
                      "hits": 4, "misses": 3, "evictions": {}, "expirations": {}},
        "dataplane": {"workers": 2, "worker_restarts": 1, "table_version": 4},
        "fastpath": {"mode": "tc", "attached": 1, "seen": 9, "passed_up": {"fragment": 2}, "flows_not_remembered": 0},
        "announcements": {"announcer": "bird", "announcements": 3, "withdrawals": 1, "speaker": {},
                          "vips": {"10.99.0.1": {"announced": True, "reason": "1 active backend(s)", "since": 0.0},
                                   "10.99.0.2": {"announced": False, "reason": "not forwarding", "since": 0.0}}},
        "refusals": {"recent": [{"address": "10.77.0.3", "reason": "name_held", "count": 21, "last_seen": 0.5},
                                {"address": "10.77.0.9", "reason": "auth", "count": 1, "last_seen": 30.0}],
                     "total": {"auth": 1, "name_held": 21}},
    }


def test_status_shows_each_part_once_with_the_address() -> None:
    text = format_status(status())
    assert text.count("conntrack:") == 1  # the flow table was printed twice
    assert text.count("'hits': 4") == 1
    assert "10.0.0.11" in text.splitlines()[1]
    assert "packets in: 7" in text and "control: {'registrations': 1}" in text
    assert "VIP 10.99.0.1: announced by bird (1 active backend(s))" in text
    assert "VIP 10.99.0.2: not announced by bird (not forwarding)" in text


def test_backend_up_is_one_only_for_an_active_healthy_backend() -> None:
    assert 'caplance_backend_up{backend="be1"} 1' in render(status())
    for change in ({"state": "paused"}, {"state": "draining"}, {"health": "checks failing"}):
        text = render(status(**change))
        assert 'caplance_backend_up{backend="be1"} 0' in text, change
    paused = render(status(state="paused"))
    assert 'caplance_backend_state{backend="be1",state="paused"} 1' in paused
    assert 'caplance_backend_state{backend="be1",state="active"} 0' in paused
    assert "caplance_worker_restarts_total 1" in paused
    assert "caplance_conntrack_flows 3" in paused
    assert "caplance_conntrack_max_flows 10" in paused
    assert 'caplance_fastpath_attached{mode="tc"} 1' in paused
    assert 'caplance_fastpath_passed_up_total{reason="fragment"} 2' in paused


def test_metrics_show_each_vips_announcement() -> None:
    text = render(status())  # prometheus-client writes label names sorted
    assert 'caplance_vip_announced{announcer="bird",vip="10.99.0.1"} 1' in text
    assert 'caplance_vip_announced{announcer="bird",vip="10.99.0.2"} 0' in text
    assert 'caplance_announcement_changes_total{change="withdrawals"} 1' in text


def test_refusals_are_listed_with_their_source_and_counted_by_reason() -> None:
    text = format_status(status())
    assert "refusals: auth 1, name_held 21" in text
    assert "refused: 10.77.0.3 name_held x21 (last 0.5s ago)" in text
    assert "refused: 10.77.0.9 auth x1 (last 30.0s ago)" in text
    metrics = render(status())
    assert 'caplance_registrations_refused_total{reason="name_held"} 21' in metrics
    assert 'caplance_registrations_refused_total{reason="auth"} 1' in metrics
    quiet = {**status(), "refusals": {"recent": [], "total": {}}}
    assert "refus" not in format_status(quiet)


@pytest.mark.parametrize("snapshot", [
    status(), status(state="paused", health="checks failing"),
    {**status(), "backends": [], "conntrack": "off", "fastpath": {}, "announcements": {}, "dataplane": {}},
], ids=["full", "paused", "bare"])
def test_metrics_parse_back_to_the_collected_families(snapshot: dict[str, Any]) -> None:
    """The text parses (prometheus-client's own parser) to the collector's families: same names,
    types, help and samples, in order; counters keep their ``_total`` names."""
    def families(items: Any) -> list[tuple[Any, ...]]:
        return [(f.name, f.type, f.documentation, [(s.name, s.labels, s.value) for s in f.samples]) for f in items]

    text = render(snapshot)
    parsed = families(text_string_to_metric_families(text))
    assert parsed == families(StatusCollector(snapshot).collect())
    assert len(parsed) == text.count("# TYPE ")
    for line in text.splitlines():
        if line.startswith("# TYPE ") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line


def test_metrics_values_are_the_snapshots() -> None:
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(render(status())) for s in f.samples}
    assert samples[("caplance_packets_in_total", ())] == 7
    assert samples[("caplance_forwarded_bytes_total", (("backend", "be1"),))] == 500
    assert samples[("caplance_registrations_refused_total", (("reason", "name_held"),))] == 21
    assert samples[("caplance_backend_weight", (("backend", "be1"),))] == 2
    assert samples[("caplance_vip_announced", (("announcer", "bird"), ("vip", "10.99.0.2")))] == 0
