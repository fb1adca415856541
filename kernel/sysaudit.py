"""Security syscalls: client keys of users (``user_key``) and the audit trail (``audit``)."""
from __future__ import annotations

from llmos.kernel import audit


def sys_user_key(k, call):
    a = call.args
    user = k.users.set_key(a["name"], a["key"], add=not a["remove"])
    audit.event("user_key_rm" if a["remove"] else "user_key_add", user=call.user.name, target=user.name,
                key=a["key"])
    return {"user": user.name, "keys": list(user.keys)}


def sys_audit(k, call):
    a = call.args
    return audit.read(a["since"], a["user"], a["event"], a["limit"])
