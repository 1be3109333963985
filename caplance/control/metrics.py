"""The balancer's counters for Prometheus: ``GET /metrics`` on the ``metrics`` address.

:func:`render` (pure) turns a status snapshot into the text exposition format, through
prometheus-client (:class:`StatusCollector` yields the families; the library writes the text);
:func:`serve_metrics` answers HTTP GETs with it (through :mod:`caplance.httpio`: each request
bounded by a timeout, renders one at a time, at most :data:`MAX_CONNECTIONS` connections).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import trio
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from caplance.config import Endpoint
from caplance.httpio import Request, Response, serve_connection
from caplance.sockets import open_listeners

__all__ = ["StatusCollector", "StatusSource", "render", "serve_metrics"]

_TIMEOUT = 5.0
#: connections served at once; more are closed as they come (each holds a task and a descriptor)
MAX_CONNECTIONS = 32
#: the format :func:`generate_latest` writes (``CONTENT_TYPE_LATEST`` is 1.0.0, which needs
#: name-escaping negotiation we do not do)
_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4.encode()


class StatusSource(Protocol):
    def status(self) -> dict[str, Any]:
        """What ``caplance ctl status`` returns."""
        ...


#: backend states, for the state gauge
STATES = ("registering", "active", "paused", "draining", "gone")

_Samples = Iterable[tuple[Sequence[object], float]]


def _counter(name: str, help_text: str, labels: Sequence[str], samples: _Samples) -> CounterMetricFamily:
    """A counter family; ``name`` is the exposed one, with ``_total`` (the family drops it and
    the text format puts it back)."""
    family = CounterMetricFamily(name, help_text, labels=labels)
    for values, value in samples:
        family.add_metric([str(v) for v in values], value)
    return family


def _gauge(name: str, help_text: str, labels: Sequence[str], samples: _Samples) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=labels)
    for values, value in samples:
        family.add_metric([str(v) for v in values], value)
    return family


class StatusCollector(Collector):
    """The families of one status snapshot (see :meth:`StatusSource.status`)."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status
        rows = list(status["backends"])
        snapshot = status["counters"]
        control = status.get("control") or {}
        yield _counter("caplance_packets_in_total", "Packets received for the VIPs.", (),
                       [((), snapshot["packets_in"])])
        yield _counter("caplance_forwarded_packets_total", "Packets sent to each backend.", ("backend",),
                       [((k,), v) for k, v in sorted(snapshot["forwarded"].items())])
        yield _counter("caplance_forwarded_bytes_total", "Bytes sent to each backend.", ("backend",),
                       [((k,), v) for k, v in sorted(snapshot["forwarded_bytes"].items())])
        yield _counter("caplance_dropped_packets_total", "Packets dropped, by reason.", ("reason",),
                       [((k,), v) for k, v in sorted(snapshot["dropped"].items())])
        yield _counter("caplance_control_events_total", "Control-plane events, by kind.", ("event",),
                       [((k,), v) for k, v in sorted(control.items())])
        refused = (status.get("refusals") or {}).get("total") or {}
        yield _counter("caplance_registrations_refused_total", "Refused or failed agent registrations, by reason.",
                       ("reason",), [((k,), v) for k, v in sorted(refused.items())])
        yield _counter("caplance_icmp_too_big_total", "ICMP too-big errors sent to clients.", (),
                       [((), snapshot["icmp_too_big"])])
        yield _gauge("caplance_backend_up", "1 while a backend takes new flows (active and healthy), else 0.",
                     ("backend",),
                     [((r["backend"],), int(r["state"] == "active" and r["health"] == "ok")) for r in rows])
        yield _gauge("caplance_backend_state", "1 for the state each backend is in, 0 for the others.",
                     ("backend", "state"),
                     [((r["backend"], s), int(r["state"] == s)) for r in rows for s in STATES])
        yield _gauge("caplance_backend_healthy", "1 while a backend passes its health checks.", ("backend",),
                     [((r["backend"],), int(r["health"] == "ok")) for r in rows])
        yield _gauge("caplance_backend_weight", "Effective weight (0: no new flows).", ("backend",),
                     [((r["backend"],), r["effective_weight"]) for r in rows])
        dataplane = status.get("dataplane") or {}
        if "worker_restarts" in dataplane:
            yield _counter("caplance_worker_restarts_total", "Data-plane worker processes restarted.", (),
                           [((), dataplane["worker_restarts"])])
        fastpath = status.get("fastpath") or {}
        yield _gauge("caplance_fastpath_attached",
                     "1 while the kernel data plane's program is attached (its mode in the label).", ("mode",),
                     [((fastpath.get("mode", "off"),), int(fastpath.get("attached", 0)))])
        if "seen" in fastpath:
            yield _counter("caplance_fastpath_packets_total", "Packets for a VIP the kernel program saw.", (),
                           [((), fastpath["seen"])])
            yield _counter("caplance_fastpath_passed_up_total",
                           "Packets the kernel program left to the Python data plane, by reason.", ("reason",),
                           [((k,), v) for k, v in sorted(fastpath.get("passed_up", {}).items())])
            yield _counter("caplance_fastpath_flows_not_remembered_total",
                           "New flows over the per-CPU rate limit: forwarded, not remembered.", (),
                           [((), fastpath.get("flows_not_remembered", 0))])
        announcements = status.get("announcements") or {}
        if announcements.get("vips"):
            yield _gauge("caplance_vip_announced",
                         "1 while this balancer announces the VIP (its announcer in the label).", ("vip", "announcer"),
                         [((vip, announcements["announcer"]), int(state["announced"]))
                          for vip, state in sorted(announcements["vips"].items())])
            yield _counter("caplance_announcement_changes_total", "VIP announcements and withdrawals made.",
                           ("change",), [((change,), announcements.get(change, 0))
                                         for change in ("announcements", "withdrawals")])
        flows = status.get("conntrack")
        if isinstance(flows, Mapping) and flows:  # "off" when the flow table is off
            yield _gauge("caplance_conntrack_flows", "Flows in the table.", (), [((), flows["size"])])
            yield _gauge("caplance_conntrack_max_flows", "The table's bound (summed over workers).", (),
                         [((), flows["max_flows"])])
            yield _counter("caplance_conntrack_hits_total", "Table hits.", (), [((), flows["hits"])])
            yield _counter("caplance_conntrack_misses_total", "Table misses.", (), [((), flows["misses"])])
            yield _counter("caplance_conntrack_evictions_total", "Entries evicted when full.", ("segment",),
                           [((k,), v) for k, v in sorted(flows["evictions"].items())])
            yield _counter("caplance_conntrack_expirations_total", "Entries expired, by reason.", ("reason",),
                           [((k,), v) for k, v in sorted(flows["expirations"].items())])


def render(status: Mapping[str, Any]) -> str:
    """Prometheus text for a balancer's status (see :meth:`StatusSource.status`).

    A fresh registry per scrape holding only :class:`StatusCollector`: no process or
    platform collectors, nothing global.
    """
    registry = CollectorRegistry()
    registry.register(StatusCollector(status))
    return generate_latest(registry).decode()


async def serve_metrics(source: StatusSource, endpoint: Endpoint, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` on ``endpoint`` until cancelled."""
    listeners = await open_listeners(endpoint, "metrics")
    renders = trio.CapacityLimiter(1)  # one render at a time, however many requests come in
    connections = trio.CapacityLimiter(MAX_CONNECTIONS)
    task_status.started()
    await trio.serve_listeners(functools.partial(_answer, source, renders, connections), listeners)


async def _answer(source: StatusSource, renders: trio.CapacityLimiter, connections: trio.CapacityLimiter,
                  stream: trio.SocketStream) -> None:
    try:
        connections.acquire_nowait()
    except trio.WouldBlock:  # more open connections than any Prometheus needs: close this one
        await stream.aclose()
        return
    try:
        await serve_connection(stream, functools.partial(_respond, source, renders), timeout=_TIMEOUT)
    finally:
        connections.release()


async def _respond(source: StatusSource, renders: trio.CapacityLimiter, asked: Request) -> Response:
    if asked.path != b"/metrics":
        return Response(404, b"not found\n")
    if asked.method not in (b"GET", b"HEAD"):
        return Response(405, b"only GET\n", headers=((b"Allow", b"GET, HEAD"),))
    # The snapshot on the loop, the text in a thread: rendering 1000 backends takes ~50 ms,
    # which must not hold up an in-process data plane in one piece.
    # Pipelined or parallel scrapes take turns (``renders``): one thread renders, never many.
    body = (await trio.to_thread.run_sync(render, source.status(), limiter=renders)).encode()
    return Response(200, body, content_type=_CONTENT_TYPE)
