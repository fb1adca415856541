"""The kernel's half of the syscall table: syscall number -> handler function.

Like xv6's ``syscalls[]``: data, indexed by number, built once. Handlers are thin adapters
(take checked arguments, call the real function, return a result or ``PENDING``). Every
kernel-served call in ``llmos.syscalls.table`` must have one here — checked at import.
"""
from __future__ import annotations

from typing import Any, Callable

from llmos.kernel import images, sysaudit, sysinfo, sysmm, sysmodel, sysproc, syssvc, systenancy, userfs
from llmos.kernel.procio import PENDING_REPLY
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import BY_NAME, CLUSTER, SYSCALLS

_BY_NAME: dict[str, Callable] = {
    "nop": sysinfo.sys_nop,
    "bye": sysinfo.sys_bye,
    "user_key": sysaudit.sys_user_key,
    "audit": sysaudit.sys_audit,
    "users_sync": sysaudit.sys_users_sync,
    "svc_attach": syssvc.sys_svc_attach,
    "uname": sysinfo.sys_uname,
    "whoami": sysinfo.sys_whoami,
    "stat": sysinfo.sys_stat,
    "shutdown": sysinfo.sys_shutdown,
    "user_add": sysinfo.sys_user_add,
    "user_token": sysinfo.sys_user_token,
    "user_list": sysinfo.sys_user_list,
    "devinfo": sysinfo.sys_devinfo,
    "ps": sysproc.sys_ps,
    "meminfo": sysproc.sys_meminfo,
    "spawn": sysproc.sys_spawn,
    "write": sysproc.sys_write,
    "read": sysproc.sys_read,
    "wait": sysproc.sys_wait,
    "kill": sysproc.sys_kill,
    "nice": sysproc.sys_nice,
    "fork": sysproc.sys_fork,
    "pinfo": sysproc.sys_pinfo,
    "model_load": sysmodel.sys_model_load,
    "model_unload": sysmodel.sys_model_unload,
    "models": sysmodel.sys_models,
    "free": sysmodel.sys_free,
    "svc_list": syssvc.sys_svc_list,
    "svc_start": syssvc.sys_svc_start,
    "svc_stop": syssvc.sys_svc_stop,
    "svc_register": syssvc.sys_svc_register,
    "svc_heartbeat": syssvc.sys_svc_heartbeat,
    "svc_reply": syssvc.sys_svc_reply,
    "svc_call": syssvc.sys_svc_call,
    "mm_lease": sysmm.sys_mm_lease,
    "mm_release": sysmm.sys_mm_release,
    "mm_leases": sysmm.sys_mm_leases,
    "feedback": userfs.sys_feedback,
    "alerts": sysinfo.sys_alerts,
    "alert_set": sysinfo.sys_alert_set,
    "user_set": systenancy.sys_user_set,
    "shares": systenancy.sys_shares,
    "checkpoint": images.sys_checkpoint,
    "restore": images.sys_restore,
}

HANDLERS: dict[int, Callable] = {BY_NAME[name].num: fn for name, fn in _BY_NAME.items()}

_missing = [s.name for s in SYSCALLS if s.served_by == "kernel" and s.num not in HANDLERS]
assert not _missing, f"kernel-served syscalls without a handler: {_missing}"


def dispatch(kernel, call) -> Any:
    """Run a kernel call's handler, or forward a service's call to that service."""
    if call.sc.served_by == CLUSTER:
        raise SyscallError("ENOTSUP", f"{call.sc.name}: this is a kernel, not a cluster's front (llmos cluster up)")
    if call.sc.served_by != "kernel":
        kernel.services.forward(call)
        return PENDING_REPLY
    return HANDLERS[call.sc.num](kernel, call)
