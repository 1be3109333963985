"""The balancer's counters for Prometheus: ``GET /metrics`` on the ``metrics`` address.

:func:`render` (pure) turns counters into the text exposition format; :func:`serve_metrics`
answers HTTP GETs with it. One request per connection, bounded by a timeout.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import trio

from caplance.config import Endpoint
from caplance.sockets import open_listeners

__all__ = ["StatusSource", "render", "serve_metrics"]

log = logging.getLogger(__name__)
_TIMEOUT = 5.0


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, object], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{key}="{_label(val)}"' for key, val in labels.items())
        lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")
    return lines


class StatusSource(Protocol):
    def status(self) -> dict[str, Any]:
        """What ``caplance ctl status`` returns."""
        ...


#: backend states, for the state gauge
STATES = ("registering", "active", "paused", "draining", "gone")


def render(status: Mapping[str, Any]) -> str:
    """Prometheus text for a balancer's status (see :meth:`StatusSource.status`)."""
    rows = list(status["backends"])
    snapshot = status["counters"]
    control = status.get("control") or {}
    lines = _family("caplance_packets_in_total", "counter", "Packets received for the VIPs.",
                    [({}, snapshot["packets_in"])])
    lines += _family("caplance_forwarded_packets_total", "counter", "Packets sent to each backend.",
                     [({"backend": k}, v) for k, v in sorted(snapshot["forwarded"].items())])
    lines += _family("caplance_forwarded_bytes_total", "counter", "Bytes sent to each backend.",
                     [({"backend": k}, v) for k, v in sorted(snapshot["forwarded_bytes"].items())])
    lines += _family("caplance_dropped_packets_total", "counter", "Packets dropped, by reason.",
                     [({"reason": k}, v) for k, v in sorted(snapshot["dropped"].items())])
    lines += _family("caplance_control_events_total", "counter", "Control-plane events, by kind.",
                     [({"event": k}, v) for k, v in sorted(control.items())])
    refused = (status.get("refusals") or {}).get("total") or {}
    lines += _family("caplance_registrations_refused_total", "counter",
                     "Refused or failed agent registrations, by reason.",
                     [({"reason": k}, v) for k, v in sorted(refused.items())])
    lines += _family("caplance_icmp_too_big_total", "counter", "ICMP too-big errors sent to clients.",
                     [({}, snapshot["icmp_too_big"])])
    lines += _family("caplance_backend_up", "gauge",
                     "1 while a backend takes new flows (active and healthy), else 0.",
                     [({"backend": r["backend"]}, int(r["state"] == "active" and r["health"] == "ok"))
                      for r in rows])
    lines += _family("caplance_backend_state", "gauge", "1 for the state each backend is in, 0 for the others.",
                     [({"backend": r["backend"], "state": s}, int(r["state"] == s)) for r in rows for s in STATES])
    lines += _family("caplance_backend_healthy", "gauge", "1 while a backend passes its health checks.",
                     [({"backend": r["backend"]}, int(r["health"] == "ok")) for r in rows])
    lines += _family("caplance_backend_weight", "gauge", "Effective weight (0: no new flows).",
                     [({"backend": r["backend"]}, r["effective_weight"]) for r in rows])
    dataplane = status.get("dataplane") or {}
    if "worker_restarts" in dataplane:
        lines += _family("caplance_worker_restarts_total", "counter", "Data-plane worker processes restarted.",
                         [({}, dataplane["worker_restarts"])])
    fastpath = status.get("fastpath") or {}
    lines += _family("caplance_fastpath_attached", "gauge",
                     "1 while the kernel data plane's program is attached (its mode in the label).",
                     [({"mode": fastpath.get("mode", "off")}, int(fastpath.get("attached", 0)))])
    if "seen" in fastpath:
        lines += _family("caplance_fastpath_packets_total", "counter", "Packets for a VIP the kernel program saw.",
                         [({}, fastpath["seen"])])
        lines += _family("caplance_fastpath_passed_up_total", "counter",
                         "Packets the kernel program left to the Python data plane, by reason.",
                         [({"reason": k}, v) for k, v in sorted(fastpath.get("passed_up", {}).items())])
        lines += _family("caplance_fastpath_flows_not_remembered_total", "counter",
                         "New flows over the per-CPU rate limit: forwarded, not remembered.",
                         [({}, fastpath.get("flows_not_remembered", 0))])
    announcements = status.get("announcements") or {}
    if announcements.get("vips"):
        lines += _family("caplance_vip_announced", "gauge",
                         "1 while this balancer announces the VIP (its announcer in the label).",
                         [({"vip": vip, "announcer": announcements["announcer"]}, int(state["announced"]))
                          for vip, state in sorted(announcements["vips"].items())])
        lines += _family("caplance_announcement_changes_total", "counter", "VIP announcements and withdrawals made.",
                         [({"change": change}, announcements.get(change, 0))
                          for change in ("announcements", "withdrawals")])
    flows = status.get("conntrack")
    if flows:
        lines += _family("caplance_conntrack_flows", "gauge", "Flows in the table.", [({}, flows["size"])])
        lines += _family("caplance_conntrack_max_flows", "gauge", "The table's bound (summed over workers).",
                         [({}, flows["max_flows"])])
        lines += _family("caplance_conntrack_hits_total", "counter", "Table hits.", [({}, flows["hits"])])
        lines += _family("caplance_conntrack_misses_total", "counter", "Table misses.", [({}, flows["misses"])])
        lines += _family("caplance_conntrack_evictions_total", "counter", "Entries evicted when full.",
                         [({"segment": k}, v) for k, v in sorted(flows["evictions"].items())])
        lines += _family("caplance_conntrack_expirations_total", "counter", "Entries expired, by reason.",
                         [({"reason": k}, v) for k, v in sorted(flows["expirations"].items())])
    return "\n".join(lines) + "\n"


async def serve_metrics(source: StatusSource, endpoint: Endpoint, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` on ``endpoint`` until cancelled."""
    listeners = await open_listeners(endpoint, "metrics")
    task_status.started()
    await trio.serve_listeners(functools.partial(_answer, source), listeners)


async def _answer(source: StatusSource, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            with trio.fail_after(_TIMEOUT):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                if request.split(b" ", 2)[:2] == [b"GET", b"/metrics"]:
                    body = render(source.status()).encode()
                    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                else:
                    body, head = b"not found\n", b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
                await stream.send_all(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the balancer
            log.debug("metrics request failed", extra={"error": repr(exc)})
