"""The one command table behind the shell and the one-shot ``llmos CMD`` commands.

A command is a name, an argparse parser and a function ``fn(ctx, args) -> exit code | None``.
``run_command`` is the single entry: it parses, calls, and turns every failure into one short
line (a usage line, or ``ERRNO: message``), never a traceback. ``Ctx`` holds the connection and
reconnects after the kernel went away, so the shell outlives kernel restarts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from rich.console import Console

from llmos.syscalls import locate
from llmos.syscalls.client import Client, connect
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import SYSCALLS, SERVICE_CAP
from llmos.userland import render

# errnos that mean "no kernel to talk to" (client side), not "the kernel refused"
UNREACHABLE = ("ECONNREFUSED", "ECONNRESET")


class UsageError(Exception):
    """Wrong arguments: the message is the usage line and what was wrong."""


class HelpShown(Exception):
    """``-h`` was given: the help was printed, nothing else to do."""


class ArgParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so the shell survives a bad line."""

    def error(self, message):
        raise UsageError(f"{self.format_usage().strip()}\n{self.prog}: {message}")

    def exit(self, status=0, message=None):
        if message:
            raise UsageError(message.strip())
        raise HelpShown()

    def print_help(self, file=None):
        print(self.format_help().rstrip(), file=file)


@dataclass
class Command:
    name: str
    help: str
    fn: Callable
    parser: ArgParser
    words: tuple[str, ...] = ()          # sub-command words, for completion
    shell_only: bool = False


COMMANDS: dict[str, Command] = {}
ALIASES: dict[str, str] = {"quit": "exit", "?": "help", "sh": "shell"}


def arg(*flags, **kw):
    return flags, kw


def command(name: str, help: str, *args, words: tuple[str, ...] = (), shell_only: bool = False,
            json: bool = True, epilog: str | None = None, build: Callable | None = None):
    """Register ``fn`` as command ``name``; ``args`` are ``arg(...)`` argparse declarations."""
    def register(fn):
        p = ArgParser(prog=name, description=help, add_help=True, epilog=epilog,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
        for flags, kw in args:
            p.add_argument(*flags, **kw)
        if build is not None:
            build(p)
        if json and build is None:
            p.add_argument("--json", action="store_true", help="print the result as JSON")
        COMMANDS[name] = Command(name, help, fn, p, words, shell_only)
        return fn
    return register


def subcommands(p: ArgParser, *specs) -> None:
    """Sub-commands (``kg add``, ``tune list``): ``specs`` are ``(name, help, [arg(...), ...])``."""
    subs = p.add_subparsers(dest="sub", metavar="|".join(s[0] for s in specs), parser_class=ArgParser)
    subs.required = True
    for name, help, args in specs:
        sp = subs.add_parser(name, help=help, description=help)
        for flags, kw in args:
            sp.add_argument(*flags, **kw)
        sp.add_argument("--json", action="store_true", help="print the result as JSON")


class Ctx:
    """What a command runs with: the console, the connection, and how to ask the user."""

    def __init__(self, console: Console | None = None, socket: str | None = None,
                 token: str | None = None, interactive: bool = False):
        self.console = console or render.make_console()
        self.err_console = render.make_console(sys.stderr)
        self.socket, self.token = socket, token
        self.interactive = interactive          # inside the shell
        self.as_json = False
        self.ask: Callable[[str], str] = input   # the shell replaces it with its prompt
        self._client: Client | None = None
        self._calls: dict[str, dict] = {}
        self._calls_at = 0.0

    @property
    def endpoint(self) -> str:
        return self.socket or os.environ.get("LLMOS_SOCKET") or locate.default_socket()

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = connect(self.socket, self.token)
        return self._client

    def drop(self) -> None:
        """Forget the connection: the next call makes a fresh one (a restarted kernel is a new peer)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def call(self, name: str, /, **args):
        """A call that may not exist yet (a service's, or a newer kernel's): ENOSYS says so."""
        try:
            return self.client.call(name, **{k: v for k, v in args.items() if v is not None})
        except SyscallError as err:
            if err.errno == "ENOSYS":
                hint = (f" (no service serves {name.split('_')[0]}_* calls right now: `svc list` shows what runs)"
                        if isinstance(name, str) and "_" in name else "")
                raise SyscallError("ENOSYS", f"{err.message}{hint}") from None
            raise

    def out(self, obj, renderable=None) -> None:
        render.emit(self.console, obj, self.as_json, renderable)

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, highlight=False)

    def error(self, text: str) -> None:
        self.console.file.flush()
        self.err_console.print(text, style="red", markup=False, highlight=False)

    # -- call names for completion: the table plus what services registered --------------------
    def call_names(self) -> dict[str, list[str]]:
        """name -> argument names, for every call a user can make."""
        names = {s.name: [a.name for a in s.args] for s in SYSCALLS if s.cap != SERVICE_CAP}
        names.update(self._calls)
        return names

    def refresh_calls(self, max_age: float = 5.0) -> None:
        if self._client is None or time.monotonic() - self._calls_at < max_age:
            return
        self._calls_at = time.monotonic()
        try:
            rows = self._client.svc_list(_timeout=2.0)
        except SyscallError:
            return
        self._calls = {n: list(s.get("args") or []) for r in rows for n, s in (r.get("schemas") or {}).items()
                       if s.get("cap") != SERVICE_CAP}


def run_command(ctx: Ctx, argv: list[str]) -> int:
    """Run one command line (already split into words). Returns its exit status."""
    if not argv:
        return 0
    name = ALIASES.get(argv[0], argv[0])
    cmd = COMMANDS.get(name)
    if cmd is None or (cmd.shell_only and not ctx.interactive):
        ctx.error(f"llmos: unknown command '{argv[0]}'. Commands: {', '.join(visible_commands(ctx))}. "
                  f"Try `help COMMAND`.")
        return 2
    words = argv[1:]
    as_json = name != "run" and "--json" in words        # --json anywhere, as before
    if as_json:
        words = [w for w in words if w != "--json"]
    try:
        args = cmd.parser.parse_args(words)
    except UsageError as err:
        ctx.error(str(err))
        return 2
    except HelpShown:
        return 0
    ctx.as_json = as_json
    try:
        rc = cmd.fn(ctx, args)
    except UsageError as err:
        ctx.error(f"{cmd.parser.format_usage().strip()}\n{name}: {err}")
        return 2
    except SyscallError as err:
        if err.errno in UNREACHABLE or (err.errno == "ETIMEDOUT" and "the kernel" in err.message):
            ctx.drop()
            then = "retrying on the next command" if ctx.interactive else "is it running? (`llmos kernel status`)"
            ctx.error(f"kernel not reachable at {ctx.endpoint} ({err.errno}: {err.message}); {then}")
        else:
            ctx.error(f"{err.errno}: {err.message}")
        return 1
    except OSError as err:       # local files (put/get/run)
        ctx.error(f"{name}: {err.strerror or err}: {err.filename or ''}".rstrip(": "))
        return 1
    finally:
        ctx.as_json = False
    return rc or 0


def visible_commands(ctx: Ctx) -> list[str]:
    return [n for n, c in COMMANDS.items() if ctx.interactive or not c.shell_only]


def load_commands() -> dict[str, Command]:
    """Import every module that registers commands (once)."""
    from llmos.userland import sh_procs, sh_chat, top, sh_data, sh_system, sh_remote  # noqa: F401  (help order)
    return COMMANDS
