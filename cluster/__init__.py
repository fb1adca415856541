"""One llmos over many devices and machines: kernels as Ray actors behind one ABI front.

``launch`` (Ray: start or join, placement groups, named actors), ``actor`` (a kernel as an
actor), ``members`` (the front's record of each kernel), ``front`` (routing every call),
``pids`` (global pids), ``placement`` (where a spawn goes), ``merge`` (many answers as one),
``lifecycle`` (joins, deaths, restarts), ``drain`` (migration), ``serve`` (the front process).
See docs/cluster.md.
"""
