"""``chat``: one conversation = one interactive process, continued turn by turn with ``write``.

Ctrl-C stops the answer being streamed: ``kill(pid, "INT")`` ends the turn and the process
keeps its KV and waits for the next message, so the conversation stays one process (the
partial answer is part of it). ``/exit`` or Ctrl-D ends the chat (and its process).
"""
from __future__ import annotations

import sys

from llmos.syscalls.errors import SyscallError
from llmos.userland.sh_base import arg, command
from llmos.userland.sh_procs import stream_turn

CHAT_HELP = ("/exit (or Ctrl-D) leaves, Ctrl-C stops an answer, /pid shows the process, "
             "/rate N [correction] sends feedback on the last answer, /help this line")


class Chat:
    def __init__(self, ctx, args):
        self.ctx, self.args = ctx, args
        self.pid: int | None = None
        self.messages: list[dict] = []         # the transcript, to start over after Ctrl-C

    def spawn_args(self) -> dict:
        a = self.args
        return dict(model=a.model, adapter=a.adapter, priority=a.priority, max_tokens=a.max_tokens,
                    temperature=a.temperature, ignore_eos=a.ignore_eos or None, interactive=True)

    def turn(self, text: str) -> None:
        c = self.ctx.client
        self.messages.append({"role": "user", "content": text})
        if self.pid is None:
            self.pid = c.spawn(messages=list(self.messages), **self.spawn_args())
        else:
            c.write(self.pid, messages=[{"role": "user", "content": text}])
        answer = ""
        try:
            final = stream_turn(self.ctx, self.pid, markdown=self.args.markdown)
            answer = final.get("text", "")
            if final.get("finish_reason") in ("terminated", "killed", "error"):
                self.ctx.say(f"[process {self.pid} ended: {final.get('finish_reason')}]", style="yellow")
                self._forget()
        except KeyboardInterrupt:
            self.ctx.console.file.write("\n")
            answer = self._stop()
        self.messages.append({"role": "assistant", "content": answer})

    def _stop(self) -> str:
        """Ctrl-C: end the turn (INT); the process keeps its KV and waits for the next message."""
        pid, c = self.pid, self.ctx.client
        answer = "(interrupted)"          # the transcript; the process holds the real tokens
        try:
            c.kill(pid, sig="INT")
        except SyscallError as err:
            self.ctx.error(f"{err.errno}: {err.message}")
            self._forget()
            return answer
        self.ctx.say(f"[answer stopped; process {pid} waits for your next message]", style="yellow")
        return answer

    def _forget(self) -> None:
        self.pid = None

    def close(self) -> None:
        if self.pid is not None:
            try:
                self.ctx.client.wait(self.pid, timeout=10.0)   # between turns: ends and reaps it
            except SyscallError:
                pass
            self.pid = None

    def command(self, line: str) -> bool:
        """A ``/`` command; False when the chat should end."""
        word, _, rest = line[1:].partition(" ")
        if word in ("exit", "quit", "q"):
            return False
        if word == "pid":
            self.ctx.say(f"process {self.pid}" if self.pid else "no process yet", style="dim")
        elif word == "rate":
            rating, _, correction = rest.partition(" ")
            try:
                r = self.ctx.call("feedback", pid=self.pid, rating=int(rating), correction=correction or None)
                self.ctx.say(f"feedback recorded ({r})", style="dim")
            except (ValueError, TypeError):
                self.ctx.error("usage: /rate N [correction]")
            except SyscallError as err:
                self.ctx.error(f"{err.errno}: {err.message}")
        else:
            self.ctx.say(CHAT_HELP, style="dim")
        return True


def _ask_piped(prompt: str) -> str:
    """Messages from a pipe: show each one as if typed, so the transcript reads right."""
    line = input()
    print(prompt + line, flush=True)
    return line


@command("chat", "Chat with a model: one interactive process, streamed answers.",
         arg("model", nargs="?", help="model name (default: the kernel's default)"),
         arg("--adapter", help="LoRA adapter directory or loaded adapter name"),
         arg("-p", "--priority", type=int, default=0),
         arg("-n", "--max-tokens", type=int, default=256, help="tokens per answer"),
         arg("-t", "--temperature", type=float, default=0.0),
         arg("--ignore-eos", action="store_true", help="answer until max-tokens (benchmarks)"),
         arg("-e", "--message", action="append", help="send this message (repeatable) instead of asking"),
         arg("--markdown", action="store_true", help="render answers as markdown (on a terminal)"),
         json=False)
def chat(ctx, a):
    chat = Chat(ctx, a)
    if a.message:
        try:
            for text in a.message:
                chat.turn(text)
        finally:
            chat.close()
        return
    ctx.say(f"chat with {a.model or 'the default model'}; {CHAT_HELP}", style="dim")
    ask = ctx.ask if ctx.interactive or sys.stdin.isatty() else _ask_piped
    try:
        while True:
            try:
                line = ask("you> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not chat.command(line):
                    break
                continue
            chat.turn(line)
    finally:
        chat.close()
    ctx.say("chat ended", style="dim")
