"""A throwaway lab of network namespaces for the demo, the tests and the benchmarks.

Not part of the balancer: it builds hosts (a client, a balancer, backends) joined by a bridge
in a namespace of their own, with unique names per lab, and removes all of it again.
"""

from caplance.lab.http import fetch_many, serve_name
from caplance.lab.netns import Lab, LabHost

__all__ = ["Lab", "LabHost", "fetch_many", "serve_name"]
