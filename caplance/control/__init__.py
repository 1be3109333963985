"""The control plane: membership and its events, agent sessions (the balancer's side),
health checks, selector rebuilds, ``caplance ctl`` and metrics -- and the
:class:`~caplance.control.plane.ControlPlane` that ties them together and publishes
:class:`~caplance.forwarding.ForwardingTable` values for the data planes.

Importing this package imports none of its modules (the pure ``membership`` stays cheap).
"""
