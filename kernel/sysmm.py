"""Memory-lease syscalls: device memory lent to services (see ``llmos.kernel.leases``)."""
from __future__ import annotations

from llmos.syscalls.errors import SyscallError


def _leases(k):
    if k.procs.models is None:
        raise SyscallError("ENOENT", "this kernel runs without a device (--model none): nothing to lease")
    return k.procs.models.leases


def sys_mm_lease(k, call):
    a = call.args
    lease = _leases(k).grant(k.procs.models, call.user.name, a["bytes"], a["priority"], a["purpose"])
    return lease.row()


def sys_mm_release(k, call):
    _leases(k).release(call.user.name, call.args["lease"])
    k.procs.retry_faulted()                  # a model waiting for these bytes may load now
    return True


def sys_mm_leases(k, call):
    if k.procs.models is None:
        return []
    return k.procs.models.leases.rows()
