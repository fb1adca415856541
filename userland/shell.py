"""The interactive shell: ``llmos`` (or ``llmos shell``).

A prompt_toolkit prompt with history in the state directory, completion of commands, sub-commands
and call names (the syscall table plus whatever services registered), and multi-line input (a
trailing backslash or Esc+Enter continues the line). Each line runs through the same command
table as the one-shot ``llmos CMD``. Nothing a line does ends the shell: errors are one line,
Ctrl-C interrupts the command, a kernel that went away is reconnected to on the next command.
"""
from __future__ import annotations

import shlex
import signal

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings

from llmos.syscalls import locate
from llmos.syscalls.errors import SyscallError
from llmos.userland.sh_base import ALIASES, COMMANDS, Ctx, load_commands, run_command, visible_commands
from llmos.userland.sh_system import ExitShell

HISTORY_NAME = "shell_history"


class ShellCompleter(Completer):
    """Command names first; then sub-commands, call names after ``call``, ``key=`` after a call
    name, command names after ``help``."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        words = text.split()
        if not words or (len(words) == 1 and not text.endswith((" ", "\n"))):
            yield from _matching(words[0] if words else "", visible_commands(self.ctx) + list(ALIASES))
            return
        current = "" if text.endswith((" ", "\n")) else words[-1]
        done = words if current == "" else words[:-1]        # the words before the one being typed
        name = ALIASES.get(done[0], done[0])
        if name == "help" and len(done) == 1:
            yield from _matching(current, visible_commands(self.ctx))
        elif name == "call" and len(done) == 1:
            self.ctx.refresh_calls()            # a service started since the last command counts too
            yield from _matching(current, sorted(self.ctx.call_names()))
        elif name == "call" and len(done) >= 2 and "=" not in current:
            used = {w.split("=", 1)[0] for w in done[2:]}
            args = [a + "=" for a in self.ctx.call_names().get(done[1], []) if a not in used]
            yield from _matching(current, args)
        elif name in COMMANDS and len(done) == 1 and COMMANDS[name].words:
            yield from _matching(current, list(COMMANDS[name].words))


def _matching(prefix: str, candidates):
    for c in candidates:
        if c.startswith(prefix):
            yield Completion(c, start_position=-len(prefix))


def key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("enter")
    def _(event):
        buf = event.current_buffer
        if buf.document.text_before_cursor.endswith("\\"):
            buf.insert_text("\n")                      # continue on the next line
        elif buf.complete_state and buf.complete_state.current_completion:
            buf.apply_completion(buf.complete_state.current_completion)
        else:
            buf.validate_and_handle()

    @kb.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")
    return kb


def join_lines(text: str) -> str:
    """A backslash at the end of a line continues it (as in sh)."""
    return text.replace("\\\n", " ")


def split_line(text: str) -> list[str]:
    """Words of a command line (shell quoting); ValueError on unbalanced quotes."""
    return shlex.split(join_lines(text), comments=True)


class Shell:
    def __init__(self, ctx: Ctx | None = None):
        load_commands()
        self.ctx = ctx or Ctx(interactive=True)
        self.ctx.interactive = True
        state = locate.state_dir()
        history = InMemoryHistory()
        try:
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            history = FileHistory(str(state / HISTORY_NAME))
        except OSError:
            pass
        kb = key_bindings()
        self.session = PromptSession(history=history, completer=ShellCompleter(self.ctx), key_bindings=kb,
                                     complete_while_typing=False, multiline=True,
                                     prompt_continuation=lambda width, *_: "." * (width - 1) + " ")
        self.chat_session = PromptSession(history=InMemoryHistory(), key_bindings=kb, multiline=True,
                                          prompt_continuation=lambda width, *_: "." * (width - 1) + " ")
        self.ctx.ask = lambda message: join_lines(self.chat_session.prompt(message))
        self.alert_seq: int | None = None       # alert events up to here were shown (None: not asked yet)

    def greet(self) -> None:
        try:
            u, me = self.ctx.client.uname(), self.ctx.client.whoami()
            models = ", ".join(m["name"] for m in u.get("models") or []) or "no models"
            self.ctx.say(f"llmos {u.get('version')} on {u.get('device')} ({models}); you are {me.get('user')}. "
                         f"`help` lists commands.", style="dim")
        except SyscallError as err:
            self.ctx.drop()
            self.ctx.error(f"kernel not reachable at {self.ctx.endpoint} ({err.errno}: {err.message}); retrying on the "
                           f"next command (`llmos kernel start` starts one)")

    def prompt_text(self) -> str:
        return "llmos> "

    def show_alerts(self) -> None:
        """New alert events (the kernel's ``alerts``), one line each, before the next prompt."""
        try:
            r = self.ctx.client.alerts(since=self.alert_seq)
        except (SyscallError, AttributeError):
            return                               # no kernel just now (or an older one): nothing to say
        if self.alert_seq is None:
            for a in r.get("active", []):
                self.ctx.say(f"[alert] {a.get('name')} firing: {a.get('message')}", style="yellow")
        else:
            for e in r.get("events", []):
                style = "bold red" if e.get("state") == "firing" and e.get("severity") == "critical" else \
                    "yellow" if e.get("state") == "firing" else "green"
                self.ctx.say(f"[alert] {e.get('name')} {e.get('state')}: {e.get('message')}", style=style)
        self.alert_seq = r.get("seq", self.alert_seq)

    def loop(self) -> int:
        # A closed terminal (SIGHUP) unwinds like an exit, so a chat's process is ended, not left behind.
        signal.signal(signal.SIGHUP, _hangup)
        self.greet()
        self.ctx.refresh_calls(max_age=0)
        while True:
            self.show_alerts()
            try:
                line = self.session.prompt(self.prompt_text())
            except KeyboardInterrupt:
                continue                        # Ctrl-C at the prompt clears the line
            except EOFError:
                return 0
            if not self.one(line):
                return 0

    def one(self, line: str) -> bool:
        """Run one input line; False when the shell should end."""
        try:
            words = split_line(line)
        except ValueError as err:
            self.ctx.error(f"cannot parse the line: {err}")
            return True
        try:
            run_command(self.ctx, words)
        except ExitShell:
            return False
        except KeyboardInterrupt:
            self.ctx.console.file.write("\n")
            self.ctx.say("^C (interrupted)", style="yellow")
        except Exception as err:                # a bug in a command must not end the session
            self.ctx.error(f"error: {type(err).__name__}: {err}")
        self.ctx.refresh_calls()
        return True


def _hangup(signum, frame):
    raise SystemExit(129)


def main(argv: list[str] | None = None) -> int:
    return Shell().loop()
