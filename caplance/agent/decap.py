"""The agent's kernel decapsulation: ``decap.bpf.c`` on tc ingress of the backend's interface.

Packets from our balancers to our transport's port (``udp``, ``gue``) or in GRE are unwrapped
in the kernel and go on into the stack as the inner packet -- to the VIP on ``lo`` -- with
whatever the balancer's kernel left to offload (a partial checksum, a TCP aggregate) still
valid, which user-space injection cannot keep. Data-path probes and anything from elsewhere
stay wrapped, for the agent's own receiver (which echoes the probes and refuses the rest).
"""

from __future__ import annotations

import collections
import logging
import os
import struct
from pathlib import Path

from caplance.config import AgentConfig
from caplance.dataplane.bpf import libbpf
from caplance.errors import CaplanceError
from caplance.netops import NetOps, default_interface

__all__ = ["DECAP_OBJECT", "KernelDecap", "decap_unavailable"]

log = logging.getLogger(__name__)

DECAP_OBJECT = Path(__file__).resolve().parents[1] / "dataplane" / "bpf" / "decap.bpf.o"
_SETTINGS = struct.Struct("=HBx")
_REASONS = ("decapsulated", "probes_left", "not_allowed", "failed")
_PORTS = {"udp": 7001, "gue": 6080}


def decap_unavailable(config: AgentConfig) -> str | None:
    """Why the kernel cannot unwrap this agent's packets (None: it can)."""
    if config.transport.name not in (*_PORTS, "gre-raw", "gre"):
        return f"transport {config.transport.name!r} is unwrapped by the agent only"
    if os.geteuid() != 0:
        return "kernel decapsulation needs root"
    if not DECAP_OBJECT.exists():
        return f"the BPF program was not built ({DECAP_OBJECT.name} is missing: run make)"
    if not any(source.version == 4 for source in config.allowed_sources):
        return "kernel decapsulation takes packets from listed IPv4 balancers only (set balancer or balancers)"
    ok, why = libbpf.available()
    return None if ok else why


class KernelDecap:
    """The decap program on ``interface`` for ``config``'s transport and balancers."""

    def __init__(self, config: AgentConfig, interface: str | None = None) -> None:
        self.config = config
        found = interface or config.fastpath.interface or default_interface()
        if found is None:
            raise CaplanceError("no interface for kernel decapsulation: set [fastpath] interface")
        self.interface: str = found
        self._counters = -1
        self._cpus = 1
        self._final: dict[str, int] = {}

    def attach(self, netops: NetOps) -> None:
        """Load, fill and attach the program; ``netops.undo_all()`` detaches and closes it."""
        program = libbpf.BpfObject(str(DECAP_OBJECT))
        netops.push_undo("close the decap BPF object", program.close)
        program.load()
        self._cpus = libbpf.possible_cpus()
        transport = self.config.transport
        port = int(transport.options.get("port", _PORTS.get(transport.name, 0)))
        gre = transport.name in ("gre-raw", "gre")
        libbpf.map_update(program.map_fd("decap_settings"), struct.pack("=I", 0),
                          _SETTINGS.pack(0 if gre else port, int(gre)))
        for source in self.config.allowed_sources:
            if source.version == 4:
                libbpf.map_update(program.map_fd("balancers"), source.packed, b"\x01")
        self._counters = program.map_fd("decap_counters")
        prog = program.program_fd("caplance_decap")
        netops.attach_tc(self.interface, lambda index: libbpf.tc_attach(index, prog))
        netops.push_undo("forget the decap counters", self._forget)
        log.info("kernel decapsulation attached", extra={"interface": self.interface})

    def _forget(self) -> None:
        self._final = self.stats()  # what it counted until it was detached
        self._counters = -1

    def stats(self) -> dict[str, int]:
        """Its counters, summed over CPUs (their last values once detached)."""
        if self._counters < 0:
            return dict(self._final)
        found: collections.Counter[str] = collections.Counter()
        for number, name in enumerate(_REASONS):
            raw = libbpf.map_lookup(self._counters, struct.pack("=I", number), 8 * self._cpus) or b""
            found[name] = sum(value for (value,) in struct.iter_unpack("=Q", raw))
        return dict(found)
