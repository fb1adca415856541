"""Process commands: ps, spawn, read, write, wait, kill, stop, cont, nice, fork, pinfo,
checkpoint, restore."""
from __future__ import annotations

from rich.live import Live
from rich.markdown import Markdown

from llmos.userland import render
from llmos.userland.sh_base import arg, command

SIGNALS = ("TERM", "KILL", "STOP", "CONT")
_PID = arg("pid", type=int, help="process id")


def stream_turn(ctx, pid: int, echo: bool = True, markdown: bool = False) -> dict:
    """Stream the current turn of ``pid`` to the terminal; returns the final frame
    (``text`` is the whole turn's text). ``markdown`` re-renders the answer as it grows."""
    if markdown and echo and ctx.console.is_terminal:
        return _stream_markdown(ctx, pid)
    out, parts, last = ctx.console.file, [], {}
    for frame in ctx.client.read(pid):
        last = frame or {}
        text = last.get("text") or ""
        if "finish_reason" in last:
            break
        parts.append(text)
        if echo and text:
            out.write(render.printable(text))
            out.flush()
    if echo:
        tail = last.get("text") or ""
        out.write(render.printable(tail) + "\n")
        out.flush()
    return {**last, "text": "".join(parts) + (last.get("text") or "")}


def _stream_markdown(ctx, pid: int) -> dict:
    parts, last = [], {}
    with Live(Markdown(""), console=ctx.console, refresh_per_second=8, vertical_overflow="visible") as view:
        for frame in ctx.client.read(pid):
            last = frame or {}
            parts.append(last.get("text") or "")
            view.update(Markdown(render.printable("".join(parts))))
    return {**last, "text": "".join(parts)}


@command("ps", "List processes (yours; root: --all for everyone's).",
         arg("-a", "--all", action="store_true", help="every user's processes (root)"),
         arg("--lost", action="store_true", help="the processes the journal could not bring back at boot, and why"))
def ps(ctx, a):
    if a.lost:
        rows = ctx.client.ps(all=a.all, lost=True)
        ctx.out(rows, "\n".join(f"{r['pid']:>6}  {r['model']}: {r['reason']}" for r in rows) or "no lost processes")
        return
    rows = ctx.client.ps(all=a.all)
    ctx.out(rows, render.ps_view(rows, ctx.client.shares(all=a.all)))


@command("spawn", "Start a generation process; prints its pid (--follow streams its output).",
         arg("prompt", nargs="+", help="the prompt (words are joined with spaces)"),
         arg("-m", "--model", help="model name (default: the kernel's default)"),
         arg("-n", "--max-tokens", type=int, default=128),
         arg("-p", "--priority", type=int, default=0, help="nice value, -20 (most important) to 19"),
         arg("-t", "--temperature", type=float, default=0.0),
         arg("--seed", type=int),
         arg("--adapter", help="LoRA adapter directory or loaded adapter name"),
         arg("-i", "--interactive", action="store_true", help="keep it after each turn (continue with write)"),
         arg("--kg", action="store_true", help="put knowledge-graph facts about the prompt first"),
         arg("--ignore-eos", action="store_true"),
         arg("--chat", action="store_true", help="send the prompt as a user message (chat template)"),
         arg("--stopped", action="store_true", help="start it STOPPED (cont runs it)"),
         arg("-f", "--follow", action="store_true", help="stream the output of the first turn"))
def spawn(ctx, a):
    text = " ".join(a.prompt)
    pid = ctx.client.spawn(
        model=a.model, max_tokens=a.max_tokens, priority=a.priority, temperature=a.temperature,
        seed=a.seed, adapter=a.adapter, interactive=a.interactive, kg=True if a.kg else None,
        ignore_eos=a.ignore_eos, stopped=a.stopped, **({"messages": [{"role": "user", "content": text}]} if a.chat else {"prompt": text}))
    if a.follow and not ctx.as_json:
        ctx.say(f"pid {pid}", style="dim")
        stream_turn(ctx, pid)
    else:
        ctx.out({"pid": pid}, f"pid {pid}")


@command("read", "Stream the current turn of a process.", _PID)
def read(ctx, a):
    final = stream_turn(ctx, a.pid, echo=not ctx.as_json)
    if ctx.as_json:
        ctx.out(final)


@command("write", "Continue an interactive process waiting for input (starts a new turn).",
         _PID, arg("text", nargs="+"), arg("-n", "--max-tokens", type=int),
         arg("-f", "--follow", action="store_true", help="stream the new turn"))
def write(ctx, a):
    r = ctx.client.write(a.pid, text=" ".join(a.text), max_tokens=a.max_tokens)
    if a.follow and not ctx.as_json:
        stream_turn(ctx, a.pid)
    else:
        ctx.out(r)


@command("wait", "Wait for a process to end and reap it (an interactive one ends after its turn).",
         _PID, arg("--timeout", type=float, help="seconds (ETIMEDOUT after; the process is not reaped)"))
def wait(ctx, a):
    r = ctx.client.wait(a.pid, timeout=a.timeout)
    if ctx.as_json:
        ctx.out(r)
        return
    ctx.say(render.printable(r.get("text") or ""))
    usage, acct = r.get("usage") or {}, r.get("accounting") or {}
    ctx.say(f"[pid {r.get('pid')} {r.get('finish_reason')}; prompt {usage.get('prompt_tokens')}, "
            f"completion {usage.get('completion_tokens')}, cached {usage.get('cached_tokens')} tokens; "
            f"{acct.get('preemptions', 0)} preemptions]", style="dim")


@command("kill", "Send a signal: TERM/KILL end a process, STOP pauses it, CONT resumes it.",
         arg("pids", type=int, nargs="+", metavar="PID"),
         arg("-s", "--sig", type=str.upper, default="TERM", choices=SIGNALS))
def kill(ctx, a):
    return _signal(ctx, a.pids, a.sig)


@command("stop", "Pause processes (kill STOP): they keep their place and output.",
         arg("pids", type=int, nargs="+", metavar="PID"))
def stop(ctx, a):
    return _signal(ctx, a.pids, "STOP")


@command("cont", "Resume stopped processes (kill CONT).", arg("pids", type=int, nargs="+", metavar="PID"))
def cont(ctx, a):
    return _signal(ctx, a.pids, "CONT")


def _signal(ctx, pids: list[int], sig: str) -> None:
    for pid in pids:
        ctx.client.kill(pid, sig=sig)
    ctx.out({"pids": pids, "sig": sig}, f"{sig} sent to {', '.join(map(str, pids))}")


@command("nice", "Change a process's priority (-20 most important .. 19).", _PID,
         arg("value", type=int))
def nice(ctx, a):
    r = ctx.client.nice(a.pid, value=a.value)
    ctx.out(r, f"pid {r['pid']} nice {r['nice']}")


@command("fork", "Clone a live process n times (copy-on-write KV).", _PID,
         arg("-n", type=int, default=1), arg("--seed", type=int), arg("-t", "--temperature", type=float))
def fork(ctx, a):
    kids = ctx.client.fork(a.pid, n=a.n, seed=a.seed, temperature=a.temperature)
    ctx.out(kids, "children: " + " ".join(map(str, kids)))


@command("pinfo", "Everything about one process.", _PID)
def pinfo(ctx, a):
    ctx.out(ctx.client.pinfo(a.pid))


@command("checkpoint", "Write a process's image to your file store (restore makes it live again, here or "
                       "on another kernel).", _PID, arg("path", help="file-store path for the image"))
def checkpoint(ctx, a):
    r = ctx.client.checkpoint(a.pid, path=a.path)
    ctx.out(r, f"pid {r['pid']} -> {r['path']} ({r['size']} bytes)")


@command("restore", "A new process of yours from an image in your file store.",
         arg("path", help="file-store path of an image checkpoint wrote"),
         arg("--adapter", help="the adapter to use instead of the image's name for it (same hash)"))
def restore(ctx, a):
    pid = ctx.client.restore(path=a.path, adapter=a.adapter)
    ctx.out(pid, f"restored as pid {pid}")
