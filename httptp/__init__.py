"""httptp: an HTTP(S) proxy and load balancer that saves bandwidth.

A Python re-creation of the Go ``httptp`` (from the ``httpteleport`` project).
"""

__version__ = "0.1.0"
