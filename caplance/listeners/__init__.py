"""Listeners: ways to get whole IP packets for the VIPs onto the balancer.

``tun`` (default), ``raw``, ``packet`` and ``nfqueue``, registered through the
``caplance.listeners`` entry points like any third-party listener (see
:func:`caplance.plugins.make_listener`); each module says how it keeps the balancer's own
stack from answering the VIP and how it spreads flows over worker processes. Importing this
package imports none of them.
"""
