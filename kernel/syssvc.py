"""Service syscalls: what services send (register, heartbeat, reply) and what admins ask."""
from __future__ import annotations

import importlib.metadata

from llmos.kernel import audit
from llmos.kernel.procio import PENDING_REPLY
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import SERVICE_CAP, check_args

BUILTIN_SERVICES: tuple[str, ...] = ("fs", "kg", "tuner")   # = llmos.services.run.BUILTIN (a test checks)


def known_services() -> set[str]:
    return set(BUILTIN_SERVICES) | {ep.name for ep in importlib.metadata.entry_points(group="llmos.services")}


def _caller_service(k, call):
    svc = k.services.services.get(call.user.name.removeprefix("svc:"))
    if svc is None:
        raise SyscallError("EPERM", "only a running service may send this")
    return svc


def sys_svc_register(k, call):
    svc = _caller_service(k, call)
    if call.args["name"] != svc.name:
        raise SyscallError("EPERM", f"this token belongs to service {svc.name}, not {call.args['name']}")
    return {"registered": k.services.register(svc, call.identity, call.args["calls"])}


def sys_svc_heartbeat(k, call):
    k.services.heartbeat(_caller_service(k, call))
    return True


def sys_svc_reply(k, call):
    k.services.relay(_caller_service(k, call), call.args)
    return PENDING_REPLY          # one-way: no answer to the service


def sys_svc_call(k, call):
    """A service calls another service's call as one of our users (checked as if they made it)."""
    if not call.user.is_root and SERVICE_CAP not in call.user.caps:
        raise SyscallError("EPERM", "svc_call is for services (and root: a cluster kernel's upstream)")
    svc = None if call.user.is_root else _caller_service(k, call)
    if svc is not None and svc.name not in BUILTIN_SERVICES and svc.name not in k.cfg.delegates:
        raise SyscallError("EPERM", f"service {svc.name} may not act for users (the kernel's --delegate "
                                    f"option allows a plug-in to)")
    name, uid = call.args["call"], call.args["uid"]
    target = k.services.lookup(name)
    if target is None:
        raise SyscallError("ENOSYS", f"no running service serves {name!r}")
    user = k.users.by_uid(uid)
    if svc is None:        # root, for another kernel of the cluster: with a kernel's own privilege, as here
        user = type(user)(user.name, user.uid, user.caps | {SERVICE_CAP})
    k.users.check_cap(user, target.cap, name)
    args = check_args(target, call.args["args"] or {})
    k.services.forward(type(call)(call.identity, call.rid, user, target, args))
    return PENDING_REPLY


def sys_svc_list(k, call):
    rows = k.services.rows()
    for row in rows:
        svc = k.services.services[row["name"]]
        row["schemas"] = {n: {"cap": sc.cap, "stream": sc.stream, "doc": sc.doc,
                              "args": [a.name for a in sc.args]} for n, sc in svc.calls.items()}
    return rows


def sys_svc_start(k, call):
    name = call.args["name"]
    if name not in known_services():
        raise SyscallError("ENOENT", f"no service {name!r}; known: {sorted(known_services())}")
    svc = k.services.start(name)
    return {"name": name, "pid": svc.proc.pid, "state": svc.state.value}


def sys_svc_attach(k, call):
    name = call.args["name"]
    if name in BUILTIN_SERVICES:
        raise SyscallError("EINVAL", f"{name} is a built-in service: the kernel runs it (svc_start)")
    token = k.services.attach(name)
    audit.event("service_attach", user=call.user.name, service=name)
    return {"name": name, "token": token}


def sys_svc_stop(k, call):
    k.services.stop(call.args["name"])
    return True
