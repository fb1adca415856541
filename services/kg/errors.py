"""The one exception the knowledge graph raises.

``KgError`` is a ``SyscallError``, so a service that hosts the graph can let it propagate and
the ABI turns it into an errno reply (``EINVAL``, ``ENOENT``, ``EPERM``, ``EBUSY``, ``EIO``...).
"""
from __future__ import annotations

from llmos.syscalls.errors import SyscallError


class KgError(SyscallError):
    """A refused or failed knowledge-graph operation. ``.errno`` is the ABI name."""
