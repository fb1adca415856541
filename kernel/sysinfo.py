"""Handlers for system calls about the kernel itself and its users."""
from __future__ import annotations

import time

import llmos
from llmos.kernel import audit, sysmodel
from llmos.kernel.procio import PENDING_REPLY
from llmos.syscalls.abi import ABI_VERSION
from llmos.syscalls.errors import SyscallError


def sys_nop(k, call):
    return {"boot_id": k.boot_id, "max_frame": k.cfg.max_frame, "session_timeout": k.sessions.timeout}


def sys_bye(k, call):
    """The caller's session ends cleanly: its processes are not hung up."""
    return k.sessions.bye(call.user.uid, call.session)


def sys_uname(k, call):
    return {"sysname": "llmos", "version": llmos.__version__, "abi": ABI_VERSION,
            "boot_id": k.boot_id, "device": k.device.name if k.device is not None else "none",
            "models": sysmodel.model_list(k, call.user)}


def sys_whoami(k, call):
    u = call.user
    return {"user": u.name, "uid": u.uid, "caps": sorted(u.caps)}


def sys_stat(k, call):
    s = k.stats
    return {"uptime_s": round(time.time() - s.started, 3), "requests": s.requests, "errors": s.errors,
            "rejects": dict(s.rejects), "frames_dropped": s.frames_dropped,
            "disconnects": s.disconnects, "steps": s.steps, "tokens_generated": s.tokens_generated,
            "procs": k.table.count_by_state(), **k.metrics.report(k.table.all()),
            "journal": {"enabled": k.journal.enabled, "interval_s": k.journal.interval,
                        "commits": k.journal.num_commits, "bytes_written": k.journal.bytes_written,
                        "restored": k.num_restored, "lost": len(k.lost), "damage": k.journal_damage}}


def sys_shutdown(k, call):
    """Checkpoint (the journal brings every process back at the next boot), drain (the loop
    stops once no non-interactive process is left running), or discard."""
    k.stop_mode = call.args["mode"]
    if k.stop_mode != "drain":
        k.running = False
    return True


def sys_user_add(k, call):
    user, token = k.users.add(call.args["name"], call.args["caps"])
    audit.event("user_add", user=call.user.name, target=user.name, caps=sorted(user.caps))
    return {"user": user.name, "uid": user.uid, "token": token}


def sys_user_token(k, call):
    token = k.users.new_token(call.args["name"])
    audit.event("user_token", user=call.user.name, target=call.args["name"])
    return {"user": call.args["name"], "token": token}


def sys_user_list(k, call):
    return [{"user": u.name, "uid": u.uid, "caps": sorted(u.caps), "num_tokens": len(u.token_hashes),
             "share": u.share, "keys": list(u.keys)}
            for u in sorted(k.users.users.values(), key=lambda u: u.uid)]


def sys_devinfo(k, call):
    info = k.device.info() if k.device is not None else None
    if info is None:
        raise SyscallError("ENOENT", "this kernel runs without a device driver (--model none)")
    return info


def sys_alerts(k, call):
    since, wait = call.args["since"], call.args["wait"]
    report = k.alerts.report(since)
    if since is not None and wait > 0 and not report["events"]:
        k.alerts.wait(call, since, wait)          # answered by the next event or the deadline
        return PENDING_REPLY
    return report


def sys_alert_set(k, call):
    k.alerts.set(call.args["name"], call.args["threshold"])
    k.alerts.next_check = 0.0                     # judge the new threshold at once
    return {"thresholds": dict(k.alerts.thresholds)}
