"""The kernel (BPF) data plane: ``balancer.bpf.c`` (the balancer's tc and XDP program),
``decap.bpf.c`` (the backends' tc decapsulation), their shared map layouts (``maps.h``,
mirrored by :mod:`caplance.dataplane.bpf.layout`), the ctypes loader over libbpf
(:mod:`caplance.dataplane.bpf.libbpf`) and the data plane that fills the maps from the
forwarding table (:mod:`caplance.dataplane.bpf.plane`). Importing this package imports
none of them.
"""
