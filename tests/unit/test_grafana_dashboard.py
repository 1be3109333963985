"""``examples/grafana-dashboard.json`` queries only what ``/metrics`` serves.

Every PromQL expression of the dashboard (panel targets and template variable queries) is
taken apart by a small tokenizer; each metric it names must be a family of the ``/metrics``
text, each label it selects, groups by or shows in a legend must be a label of that family
(or one Prometheus adds at scrape time), counters are only read through ``rate`` or
``increase`` and gauges never through a range. And every ``caplance_`` family has a panel.

The ``/metrics`` text comes from a real balancer (in-memory listener and transport, a real
control channel on loopback TCP, no root): static backends and a registered agent, a refused
registration, traffic to a tiny flow table so entries are evicted and expire. What that
balancer cannot produce without root -- the kernel data plane's counters and worker
restarts -- comes from the status value of ``test_status`` (:data:`FROM_FIXTURE`).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from caplance.balancer import Balancer
from caplance.config import BackendConfig, BalancerConfig, ConntrackConfig, Secret, VipConfig
from caplance.control.metrics import render
from caplance.control.rebuild import InlineBuilder
from caplance.testing import MemoryListener, RecordingTransport
from tests.builders import ipv4, tcp
from tests.component.test_control_sessions import SECRET, Rig

from .test_status import status as fixture_status

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana-dashboard.json"

#: families the in-memory balancer cannot render (no kernel data plane, one process)
FROM_FIXTURE = frozenset({"caplance_worker_restarts_total", "caplance_fastpath_packets_total",
                          "caplance_fastpath_passed_up_total", "caplance_fastpath_flows_not_remembered_total"})
#: labels Prometheus adds to every series it scrapes
SCRAPE_LABELS = frozenset({"instance", "job"})
#: Grafana's own variables
GRAFANA_VARIABLES = frozenset({"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"})

AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk",
                          "bottomk", "quantile", "count_values", "limitk", "limit_ratio"})
COUNTER_FUNCTIONS = frozenset({"rate", "irate", "increase", "resets"})
GAUGE_RANGE_FUNCTIONS = frozenset({"avg_over_time", "min_over_time", "max_over_time", "last_over_time",
                                   "changes", "deriv", "delta", "idelta", "predict_linear"})
FUNCTIONS = AGGREGATIONS | COUNTER_FUNCTIONS | GAUGE_RANGE_FUNCTIONS | frozenset({
    "abs", "absent", "absent_over_time", "ceil", "clamp", "clamp_max", "clamp_min", "floor", "round",
    "histogram_quantile", "label_replace", "label_join", "scalar", "vector", "sort", "sort_desc", "time",
    "timestamp", "count_over_time", "sum_over_time", "quantile_over_time", "ln", "log2", "log10", "exp",
    "sqrt", "sgn"})
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
OPERATORS = frozenset({"and", "or", "unless", "bool", "offset", "atan2"})

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+)
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,@(){}\[\]])
""", re.VERBOSE)


@attrs.frozen
class Use:
    """One metric where an expression names it."""

    metric: str
    labels: frozenset[str]  # in its selector
    ranged: bool  # followed by [range]
    function: str | None  # the innermost function it is an argument of


@attrs.frozen
class Query:
    uses: tuple[Use, ...]
    grouping: frozenset[str]  # labels in by/without/on/ignoring/group_* clauses
    aggregates: bool
    variables: frozenset[str]


def tokens(expr: str) -> list[tuple[str, str]]:
    out, at = [], 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        if match is None:
            raise ValueError(f"cannot read {expr[at:]!r} in {expr!r}")
        at = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, match.group()))
    return out


def parse(expr: str) -> Query:
    """The metrics, labels and variables of a PromQL expression (with Grafana variables)."""
    toks = tokens(expr)
    uses: list[Use] = []
    grouping: set[str] = set()
    variables: set[str] = set()
    aggregates = False
    calls: list[str | None] = []  # per open parenthesis: the function it calls, or None
    i = 0

    def until(closer: str) -> list[tuple[str, str]]:
        nonlocal i
        start = i
        while toks[i][1] != closer:
            i += 1
        i += 1
        return toks[start:i - 1]

    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        i += 1
        if kind == "variable":
            variables.add(text.strip("${}").split(":")[0])
        elif kind == "name" and text in GROUPING:
            if following == "(":
                i += 1
                grouping.update(t for k, t in until(")") if k == "name")
        elif kind == "name" and text in OPERATORS:
            pass
        elif kind == "name" and text in AGGREGATIONS and following in ("by", "without"):
            i += 2  # sum by (x) (...): the clause, then the call's parenthesis
            grouping.update(t for k, t in until(")") if k == "name")
            if toks[i][1] != "(":
                raise ValueError(f"{text} {following} (...) without an argument in {expr!r}")
            i += 1
            calls.append(text)
            aggregates = True
        elif kind == "name" and following == "(":
            if text not in FUNCTIONS:
                raise ValueError(f"unknown function {text!r} in {expr!r}")
            i += 1
            calls.append(text)
            aggregates |= text in AGGREGATIONS
        elif kind == "name":
            labels: set[str] = set()
            if following == "{":
                i += 1
                selector = until("}")
                labels = {t for n, (k, t) in enumerate(selector)
                          if k == "name" and n + 1 < len(selector) and selector[n + 1][1] in ("=", "!=", "=~", "!~")}
                variables.update(t.strip("${}") for k, t in selector if k == "variable")
                variables.update(v.split(":")[0] for k, t in selector if k == "string"
                                 for v in re.findall(r"\$\{?(\w+(?::\w+)?)\}?", t))
            ranged = i < len(toks) and toks[i][1] == "["
            if ranged:
                i += 1
                variables.update(t.strip("${}") for k, t in until("]") if k == "variable")
            uses.append(Use(text, frozenset(labels), ranged, next((c for c in reversed(calls) if c), None)))
        elif text == "(":
            calls.append(None)
        elif text == ")":
            calls.pop()
        elif text in ("{", "["):
            raise ValueError(f"a selector or range without a metric name in {expr!r}")
    return Query(tuple(uses), frozenset(grouping), aggregates, frozenset(variables))


def label_values(query: str) -> tuple[Query, str]:
    """``label_values(selector, label)``: the selector's parse and the label."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query, re.DOTALL)
    assert match is not None, f"not label_values(selector, label): {query!r}"
    return parse(match.group(1)), match.group(2)


@attrs.frozen
class Family:
    kind: str
    labels: frozenset[str]


def families(text: str) -> dict[str, Family]:
    """Sample name -> its kind and every label name its samples carry, from the text format."""
    kinds: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    current = ("", "untyped")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            current = (name, kind)
            names = [name, f"{name}_total"] if kind == "counter" and not name.endswith("_total") else [name]
            for one in names:  # a family with no samples yet still exists
                kinds[one] = kind
                labels.setdefault(one, set())
        elif line and not line.startswith("#"):
            name = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group()  # type: ignore[union-attr]
            kinds.setdefault(name, current[1] if name.startswith(current[0]) else "untyped")
            labels.setdefault(name, set()).update(re.findall(r'(\w+)="(?:[^"\\]|\\.)*"', line))
    return {name: Family(kinds[name], frozenset(labels[name])) for name in kinds}


# -- the /metrics text -------------------------------------------------------------------------


async def real_metrics() -> str:
    """``/metrics`` of a balancer that has seen agents, refusals, traffic, evictions and expiry."""
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = BalancerConfig(
            vips=(VipConfig(address="10.99.0.1", ports=(80,), backends=(
                BackendConfig(name="be1", address="10.0.0.11"),
                BackendConfig(name="be2", address="10.0.0.12", weight=2))),),
            control=f"127.0.0.1:{port}", secret=Secret(SECRET), control_socket=f"{tmp}/ctl.sock",
            conntrack=ConntrackConfig(max_flows=8, tcp_timeout=0.05, udp_timeout=0.05), drain_idle=0.01)
        listener, transport = MemoryListener(), RecordingTransport()
        balancer = Balancer(config, listener=listener, transports={"udp": transport}, builder=InlineBuilder())
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(balancer.run)
                rig = Rig(balancer, transport, port)
                await rig.register("agent1")
                refused = await rig.handshake(await rig.connect(), name="x", vips=["10.99.0.2"])
                assert refused["type"] == "refused"
                for n in range(40):  # 40 new flows into a table of 8: evictions
                    listener.source.push(ipv4(f"192.0.2.{n + 1}", "10.99.0.1", 6, tcp(10000 + n, 80)))
                listener.source.push(ipv4("192.0.2.1", "10.99.0.9", 6, tcp(1000, 80)))  # not a VIP: a drop
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(1.2)  # the data plane expires flows once a second
                text = render(balancer.control.status())
                for stream in rig.streams:
                    await stream.aclose()
                balancer.stop()
    return text


@pytest.fixture(scope="module")
def real() -> dict[str, Family]:
    return families(trio.run(real_metrics))


@pytest.fixture(scope="module")
def exposed(real: dict[str, Family]) -> dict[str, Family]:
    """What ``/metrics`` serves: the real balancer's families, and :data:`FROM_FIXTURE`'s."""
    fixture = families(render(fixture_status()))
    assert FROM_FIXTURE <= fixture.keys()
    return {**real, **{name: fixture[name] for name in FROM_FIXTURE}}


# -- the dashboard -----------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # in a collapsed row


def targets(board: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield panel["title"], target


def variable_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield variable["name"], query["query"] if isinstance(query, dict) else query


def test_the_tokenizer_finds_metrics_labels_and_ranges() -> None:
    query = parse('sum by (backend) (rate(caplance_a_total{instance=~"$instance",reason!="rate"}[$__rate_interval]))'
                  ' / on (backend) group_left max without (state) (caplance_b) + vector($max_flows) and sum(c)')
    assert [(u.metric, u.labels, u.ranged, u.function) for u in query.uses] == [
        ("caplance_a_total", {"instance", "reason"}, True, "rate"), ("caplance_b", set(), False, "max"),
        ("c", set(), False, "sum")]
    assert query.grouping == {"backend", "state"} and query.aggregates
    assert query.variables == {"instance", "__rate_interval", "max_flows"}
    assert not parse("caplance_up == 1").aggregates
    with pytest.raises(ValueError, match="unknown function 'rat'"):
        parse("rat(caplance_a_total[5m])")
    with pytest.raises(ValueError, match="without a metric name"):
        parse('{__name__="caplance_a"}')
    assert label_values('label_values(caplance_up{instance=~"$instance"}, backend)')[1] == "backend"


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] and board["id"] is None
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"backend", "vip"} <= {name for name, _ in variable_queries(board)}
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and all(t["datasource"] == panel["datasource"] for t in panel["targets"])
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, variable["name"]


def check(where: str, query: Query, exposed: dict[str, Family], *, legend: str = "",
          values: bool = True) -> list[str]:
    """What is wrong with ``query`` against the ``/metrics`` families (``values`` false: only
    the series' labels are read, as by ``label_values``)."""
    problems = []
    known: set[str] = set()
    for use in query.uses:
        family = exposed.get(use.metric)
        if family is None:
            problems.append(f"{where}: {use.metric} is not in /metrics")
            continue
        known |= family.labels
        for label in sorted(use.labels - family.labels - SCRAPE_LABELS):
            problems.append(f"{where}: {use.metric} has no label {label!r} (it has {sorted(family.labels)})")
        for label in sorted(query.grouping - family.labels - SCRAPE_LABELS):
            problems.append(f"{where}: groups by {label!r}, which {use.metric} does not have")
        if not values:
            continue
        if family.kind == "counter" and not (use.ranged and use.function in COUNTER_FUNCTIONS):
            problems.append(f"{where}: counter {use.metric} read without rate()/increase() over a range")
        if family.kind == "gauge" and use.ranged and use.function not in GAUGE_RANGE_FUNCTIONS:
            problems.append(f"{where}: gauge {use.metric} read through {use.function}() of a range")
    shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    available = (query.grouping if query.aggregates else known) | SCRAPE_LABELS
    problems += [f"{where}: the legend shows {label!r}, which the result has no label for"
                 for label in sorted(shown - available)]
    return problems


def test_every_query_reads_only_what_metrics_serves(exposed: dict[str, Family]) -> None:
    board = dashboard()
    defined = {v["name"] for v in board["templating"]["list"]} | GRAFANA_VARIABLES
    problems = []
    count = 0
    for title, target in targets(board):
        query = parse(target["expr"])
        count += len(query.uses)
        problems += check(f"panel {title!r} {target['refId']}", query, exposed, legend=target.get("legendFormat", ""))
        problems += [f"panel {title!r}: ${name} is not a dashboard variable" for name in query.variables - defined]
    for name, text in variable_queries(board):
        query, label = label_values(text)
        count += len(query.uses)
        problems += check(f"variable {name}", query, exposed, values=False)
        problems += [f"variable {name}: {use.metric} has no label {label!r}" for use in query.uses
                     if use.metric in exposed and label not in exposed[use.metric].labels | SCRAPE_LABELS]
    assert count > 40  # the tokenizer found the queries
    assert problems == []


def test_every_caplance_family_has_a_panel(exposed: dict[str, Family]) -> None:
    board = dashboard()
    queried = {use.metric for _, target in targets(board) for use in parse(target["expr"]).uses}
    missing = sorted(name for name in exposed if name.startswith("caplance_") and name not in queried)
    assert missing == []


def test_the_fixture_supplies_only_what_the_real_balancer_cannot(real: dict[str, Family]) -> None:
    assert FROM_FIXTURE.isdisjoint(real), "the real balancer renders these now: drop them from FROM_FIXTURE"
    # the label values the real run must have produced for the label checks to mean something
    for name, label in [("caplance_conntrack_evictions_total", "segment"),
                        ("caplance_conntrack_expirations_total", "reason"),
                        ("caplance_registrations_refused_total", "reason"),
                        ("caplance_dropped_packets_total", "reason"),
                        ("caplance_vip_announced", "vip"), ("caplance_control_events_total", "event")]:
        assert label in real[name].labels, name
