"""Security syscalls: client keys of users (``user_key``), the audit trail (``audit``) and the
user table a cluster shares (``users_sync``)."""
from __future__ import annotations

import zmq

from llmos.kernel import audit
from llmos.syscalls.errors import SyscallError


def sys_user_key(k, call):
    a = call.args
    user = k.users.set_key(a["name"], a["key"], add=not a["remove"])
    audit.event("user_key_rm" if a["remove"] else "user_key_add", user=call.user.name, target=user.name,
                key=a["key"])
    return {"user": user.name, "keys": list(user.keys)}


def sys_audit(k, call):
    a = call.args
    return audit.read(a["since"], a["user"], a["event"], a["limit"])


def sys_users_sync(k, call):
    """Root only: the table, or (``table``) this kernel's replaced by a cluster head's."""
    if not call.user.is_root:
        raise SyscallError("EPERM", "users_sync is root's (a cluster's front)")
    table, upstream = call.args["table"], call.args["upstream"]
    if upstream is not None:
        join_upstream(k, upstream)
    if table is None:
        return k.users.export()
    k.users.replace(table)
    audit.event("users_sync", user=call.user.name, users=len(k.users.users))
    return {"users": len(k.users.users)}


def join_upstream(k, where: dict) -> None:
    """From now on, the services this kernel does not run are the head's (``kernel/upstream.py``)."""
    from llmos.kernel.upstream import Upstream
    fresh = Upstream(k.io.ctx, where, k.cfg.state_dir / "keys")
    old, k.services.upstream = k.services.upstream, fresh
    if old is not None:
        k.poller.unregister(old.sock)
        old.close()
    k.poller.register(fresh.sock, zmq.POLLIN)
