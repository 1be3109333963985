"""Announcers: BGP speakers that tell the routers which VIPs this balancer serves.

``none`` (:class:`caplance.control.announce.NoAnnouncer`), ``exabgp`` and ``bird``, registered
through the ``caplance.announcers`` entry points like any third-party announcer. Each uses an
existing BGP speaker: Caplance speaks no BGP of its own. Importing this package imports none
of them.
"""
