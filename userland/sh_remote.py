"""Remote access: named remotes (``remote add|list|rm``) and the audit trail (``audit``)."""
from __future__ import annotations

import time
from pathlib import Path

from llmos.syscalls import remote as remotes
from llmos.userland import render
from llmos.userland.sh_base import UsageError, arg, command, subcommands


def _remote(p):
    subcommands(p, ("add", "Save a kernel on another machine under a name (then: llmos --remote NAME ...).",
                    [arg("name"), arg("endpoint", metavar="tcp://HOST:PORT"),
                     arg("--server-key", required=True, help="the kernel's public key (llmos kernel key there), "
                                                             "or its server.key file"),
                     arg("--token-file", required=True, help="a file holding your token on that kernel")]),
                ("list", "Saved remotes (never their tokens).", []),
                ("rm", "Forget a remote.", [arg("name")]))


@command("remote", "Kernels on other machines: remote add NAME tcp://HOST:PORT --server-key KEY --token-file F "
                   "| list | rm NAME.", build=_remote, words=("add", "list", "rm"))
def remote(ctx, a):
    if a.sub == "add":
        try:
            token = Path(a.token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read the token file: {exc}") from None
        r = remotes.add_remote(a.name, a.endpoint, a.server_key, token)
        ctx.out({"name": a.name, "endpoint": r["endpoint"], "server_key": r["server_key"]},
                f"remote {a.name}: {r['endpoint']} (llmos --remote {a.name} ...)")
    elif a.sub == "rm":
        remotes.remove_remote(a.name)
        ctx.out({"removed": a.name}, f"removed remote {a.name}")
    else:
        rows = [{"name": n, "endpoint": r["endpoint"], "server_key": r["server_key"]}
                for n, r in sorted(remotes.remotes().items())]
        ctx.out(rows, render.table(rows, ("name", "endpoint", "server_key")))


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_time(text: str) -> float:
    """``90s``, ``10m``, ``2h``, ``1d`` ago, or Unix seconds."""
    try:
        if text[-1:] in _UNITS:
            return time.time() - float(text[:-1]) * _UNITS[text[-1]]
        return float(text)
    except ValueError:
        raise UsageError(f"--since wants a duration ago (90s, 10m, 2h, 1d) or Unix seconds, got {text!r}") from None


@command("audit", "The audit trail (admin): security events, newest last.",
         arg("--since", help="from this long ago (90s, 10m, 2h, 1d) or Unix seconds"),
         arg("--user", help="only events about this user"), arg("--event", help="only this kind of event"),
         arg("-n", "--limit", type=int, default=100))
def audit(ctx, a):
    rows = ctx.client.audit(since=since_time(a.since) if a.since else None, user=a.user, event=a.event,
                            limit=a.limit)
    shown = [{"when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])), "event": r["event"],
              "user": r.get("user") or "-",
              "details": " ".join(f"{k}={v}" for k, v in r.items() if k not in ("time", "event", "user"))}
             for r in rows]
    ctx.out(rows, render.table(shown, ("when", "event", "user", "details")))
