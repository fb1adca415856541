"""System commands: memory and models, services, users, identity, tuning, raw calls, help, run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from rich.console import Group
from rich.text import Text

from llmos.syscalls import locate
from llmos.syscalls import remote as remotes
from llmos.userland import render
from llmos.userland.sh_base import COMMANDS, UsageError, arg, command, subcommands, visible_commands


class ExitShell(Exception):
    pass


@command("free", "Device and host memory: weights, KV, adapters, reserve, free.")
def free(ctx, a):
    r = ctx.client.free()
    ctx.out(r, render.free_view(r))


@command("models", "Every known model and where its weights are.")
def models(ctx, a):
    rows = ctx.client.models()
    ctx.out(rows, render.models_view(rows))


@command("load", "Bring a model onto the device (waits until it is there).", arg("name"),
         arg("--pin", action="store_true", help="never evict it"))
def load(ctx, a):
    r = ctx.client.model_load(a.name, pin=a.pin)
    ctx.out(r, f"{r.get('name')}: {r.get('where')} ({render.human_bytes(r.get('bytes'))})")


@command("unload", "Drop a model from device and host memory.", arg("name"))
def unload(ctx, a):
    ctx.client.model_unload(a.name)
    ctx.out(True, f"unloaded {a.name}")


def _svc(p):
    subcommands(p, ("list", "Services and their state.", []),
                ("start", "Start a service or plug-in.", [arg("name")]),
                ("attach", "A plug-in hosted elsewhere: prints the token its host registers with.", [arg("name")]),
                ("stop", "Stop a service.", [arg("name")]))


@command("svc", "Services: svc list | start NAME | attach NAME | stop NAME.", build=_svc,
         words=("list", "start", "attach", "stop"))
def svc(ctx, a):
    if a.sub == "list":
        rows = ctx.client.svc_list()
        ctx.out(rows, render.svc_view(rows))
    elif a.sub == "start":
        ctx.out(ctx.client.svc_start(a.name))
    elif a.sub == "attach":
        r = ctx.client.svc_attach(a.name)
        ctx.out(r, r["token"])
    else:
        ctx.client.svc_stop(a.name)
        ctx.out(True, f"stopped {a.name}")
    ctx.refresh_calls(max_age=0)


@command("whoami", "The authenticated user.")
def whoami(ctx, a):
    ctx.out(ctx.client.whoami())


@command("uname", "Kernel identity: version, ABI, device, models.")
def uname(ctx, a):
    u = ctx.client.uname()
    ms = u.get("models") or []
    ctx.out(u, Group(render.kv_table({k: v for k, v in u.items() if k != "models"}),
                     render.table(ms, ("name", "architecture", "params", "random_weights")) if ms
                     else Text("no models", style="dim")))


for _name, _help in (("stat", "Kernel counters."), ("meminfo", "KV block pool and swap usage."),
                     ("devinfo", "Device capacity and telemetry.")):
    command(_name, _help)(lambda ctx, a, _n=_name: ctx.out(ctx.client.call(_n)))


def _user(p):
    subcommands(p, ("add", "Create a user; prints only its token.",
                    [arg("name"), arg("--caps", help="comma-separated capabilities")]),
                ("token", "A new token for a user; prints only the token.", [arg("name")]),
                ("set", "Change a user's settings: share=N (fair-share weight, default 1).",
                 [arg("name"), arg("settings", nargs="+", metavar="KEY=VALUE")]),
                ("key", "Client keys for CURVE: key add|rm NAME FILE (a client.key file or a Z85 key); once "
                        "a user has one, only those keys may speak for it from another machine.",
                 [arg("action", choices=("add", "rm")), arg("name"), arg("key", metavar="FILE")]),
                ("list", "Users (never their tokens) and their shares.", []))


@command("user", "Users (admin): user add NAME [--caps a,b] | token NAME | set NAME share=N | key add|rm NAME "
                 "FILE | list.", build=_user, words=("add", "token", "set", "key", "list"))
def user(ctx, a):
    c = ctx.client
    if a.sub == "add":
        r = c.user_add(a.name, caps=a.caps.split(",") if a.caps else None)
        ctx.out(r, r["token"])
    elif a.sub == "token":
        r = c.user_token(a.name)
        ctx.out(r, r["token"])
    elif a.sub == "set":
        settings = dict(s.partition("=")[::2] for s in a.settings)
        if set(settings) != {"share"} or not all(settings.values()):
            raise UsageError("user set NAME share=N")
        try:
            share = float(settings["share"])
        except ValueError:
            raise UsageError(f"share must be a number, got {settings['share']!r}") from None
        r = c.user_set(a.name, share=share)
        ctx.out(r, f"{r['user']}: share {r['share']:g}")
    elif a.sub == "key":
        r = c.user_key(a.name, remotes.public_key_text(a.key), remove=a.action == "rm")
        ctx.out(r, f"{r['user']}: {len(r['keys'])} client key(s)")
    else:
        rows = c.user_list()
        ctx.out(rows, render.table(rows, ("user", "uid", "share", "caps", "num_tokens", "keys"),
                                   formats={"share": lambda v: f"{v:g}", "caps": lambda v: ",".join(v),
                                            "keys": lambda v: str(len(v))}))


def parse_value(v: str):
    """``key=value`` values are JSON when they parse as JSON, else strings."""
    try:
        return json.loads(v)
    except ValueError:
        return v


def kv_args(words: list[str]) -> dict:
    bad = [w for w in words if "=" not in w]
    if bad:
        raise UsageError(f"arguments are key=value, got {' '.join(bad)}")
    return {k: parse_value(v) for k, v in (w.split("=", 1) for w in words)}


@command("call", "Make any call: call NAME key=value ... (values are JSON, else strings).",
         arg("name"), arg("args", nargs="*", metavar="KEY=VALUE"))
def call(ctx, a):
    name = int(a.name) if a.name.isdigit() else a.name
    ctx.out(ctx.call(name, **kv_args(a.args)))


# -- tuning -------------------------------------------------------------------------------------
def _tune(p):
    subcommands(
        p,
        ("submit", "Fine-tune a LoRA adapter on a JSONL dataset in the file store.",
         [arg("dataset"), arg("-b", "--base", help="base model (default: the kernel's default)"),
          arg("--name", help="adapter name"), arg("-p", "--priority", type=int, help="nice value of the job"),
          arg("--val-fraction", type=float, help="held out for validation (0: validate on the training set)"),
          arg("--param", action="append", default=[], metavar="KEY=VALUE", help="training parameter"),
          arg("--search", action="append", default=[], metavar="KEY=JSON",
              help='hyper-parameter search, e.g. space=\'{"lr": [1e-4, 3e-4]}\' trials=4')]),
        ("status", "A job's state and progress.", [arg("job")]),
        ("list", "Your tuning jobs.", []),
        ("cancel", "Cancel a job.", [arg("job")]),
    )


@command("tune", "Fine-tuning jobs: tune submit|status|list|cancel.", build=_tune,
         words=("submit", "status", "list", "cancel"))
def tune(ctx, a):
    if a.sub == "submit":
        r = ctx.call("tune_submit", dataset=a.dataset, base_model=a.base, name=a.name, priority=a.priority,
                     params=kv_args(a.param) or None, search=kv_args(a.search) or None,
                     val_fraction=a.val_fraction)
        ctx.out(r, f"job {r.get('job')} submitted" if isinstance(r, dict) else None)
    elif a.sub == "status":
        r = ctx.call("tune_status", job=a.job)
        scalars = {k: v for k, v in r.items() if not isinstance(v, (dict, list))} if isinstance(r, dict) else r
        ctx.out(r, render.view(scalars))          # trials and events: --json
    elif a.sub == "list":
        rows = ctx.call("tune_list")
        cols = [c for c in ("job", "name", "state", "trial", "trials", "step", "total_steps", "loss", "eval_loss",
                            "eta_s", "adapter") if any(c in r for r in rows)]
        count = {"trials": lambda v: str(len(v)) if isinstance(v, list) else render.cell(v)}
        ctx.out(rows, render.table(rows, cols, formats=count) if rows else Text("no jobs", style="dim"))
    else:
        r = ctx.call("tune_cancel", job=a.job)
        ctx.out(r, f"job {a.job} cancelled")


@command("feedback", "Rate a process's answer (and give the answer it should have been).",
         arg("pid", type=int), arg("rating", type=int), arg("correction", nargs="*"))
def feedback(ctx, a):
    r = ctx.call("feedback", pid=a.pid, rating=a.rating, correction=" ".join(a.correction) or None)
    ctx.out(r)


# -- programs and the shell itself ----------------------------------------------------------------
def program_env(ctx) -> dict:
    """The environment a program needs for ``llmos.connect()`` to find this kernel as this user."""
    token = ctx.token or os.environ.get("LLMOS_TOKEN") or locate.saved_token()
    env = {**os.environ, "LLMOS_SOCKET": ctx.endpoint}
    if token:
        env["LLMOS_TOKEN"] = token
    return env


@command("run", "Run a Python program with LLMOS_SOCKET/LLMOS_TOKEN set; returns its exit code.",
         arg("program"), arg("args", nargs="...", help="the program's arguments"), json=False)
def run(ctx, a):
    sys.stdout.flush()
    return subprocess.call([sys.executable, a.program, *a.args], env=program_env(ctx))


@command("help", "Commands, or one command's options.", arg("topic", nargs="?"), json=False)
def help(ctx, a):
    if a.topic:
        cmd = COMMANDS.get(a.topic)
        if cmd is None:
            raise UsageError(f"no command {a.topic!r}")
        ctx.say(cmd.parser.format_help().rstrip())
        return
    rows = [{"command": n, "what": COMMANDS[n].help} for n in visible_commands(ctx)]
    ctx.console.print(render.table(rows, ("command", "what")))
    ctx.say("`help COMMAND` for its options; `call NAME k=v` makes any call"
            + ("; Tab completes, a trailing \\ or Esc+Enter continues a line" if ctx.interactive else ""),
            style="dim")


@command("exit", "Leave the shell.", json=False, shell_only=True)
def exit_(ctx, a):
    raise ExitShell()


# -- alerts -------------------------------------------------------------------------------------
@command("alerts", "Alerts firing now and their thresholds; `alerts NAME VALUE` sets one (admin, 0 = off).",
         arg("name", nargs="?", help="kv_usage, queue_wait_s, swap_rate or service_down"),
         arg("value", nargs="?", type=float, help="the new threshold"))
def alerts(ctx, a):
    if a.name is not None:
        if a.value is None:
            raise UsageError("usage: alerts [NAME VALUE]\nalerts: give a threshold after the alert's name")
        ctx.call("alert_set", name=a.name, threshold=a.value)
    r = ctx.call("alerts")
    rows = [{"alert": name, "threshold": limit, "firing": "yes" if name in {x["name"] for x in r["active"]} else "",
             "value": next((x["value"] for x in r["active"] if x["name"] == name), ""),
             "message": next((x["message"] for x in r["active"] if x["name"] == name), "")}
            for name, limit in sorted(r["thresholds"].items())]
    ctx.out(r, render.table(rows, ("alert", "threshold", "firing", "value", "message")))
