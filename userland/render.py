"""Rendering shared by the shell and the one-shot commands: syscall results -> rich renderables.

Every function here is pure (data in, renderable or string out), so output can be tested
without a terminal. ``emit`` is the one place that decides between JSON and a table.
"""
from __future__ import annotations

import base64
import json
import os
import sys
import time
from typing import Any, Iterable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text


def make_console(file=None) -> Console:
    """A console for the terminal; piped output gets a wide, colourless one so tables survive."""
    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    return Console(file=file, width=None if tty else 160, soft_wrap=False,
                   no_color=not tty or bool(os.environ.get("NO_COLOR")), highlight=tty)


def printable(text: str) -> str:
    """Model output may hold control characters (random weights emit anything): keep the
    terminal sane. Newlines and tabs stay."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else "·" for ch in text)


def human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-" if n is None else str(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        text = json.dumps(value, default=_json_default)
        return text if len(text) <= 60 else text[:59] + "…"
    return printable(str(value))


def table(rows: list[dict], cols: Iterable[str] | None = None, title: str | None = None,
          formats: dict | None = None) -> Table:
    """A table of dict rows; ``formats`` maps a column to a function value -> str."""
    cols = list(cols or (rows[0] if rows else []))
    formats = formats or {}
    t = Table(title=title, box=None, header_style="bold", pad_edge=False, title_justify="left")
    for c in cols:
        t.add_column(c.upper(), overflow="fold")
    for r in rows:
        t.add_row(*[formats.get(c, cell)(r.get(c)) for c in cols])
    return t


def kv_table(d: dict, title: str | None = None) -> Table:
    t = Table(title=title, box=None, show_header=False, pad_edge=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in d.items():
        t.add_row(str(k), cell(v))
    return t


def _flat(d: dict) -> bool:
    return all(not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))
               for v in d.values())


def view(obj: Any):
    """The natural rendering of any syscall result."""
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        cols: list[str] = []
        for r in obj:
            cols += [k for k in r if k not in cols]
        return table(obj, cols)
    if isinstance(obj, list) and not obj:
        return Text("(none)", style="dim")
    if isinstance(obj, dict) and _flat(obj):
        return kv_table(obj)
    if isinstance(obj, str):
        return Text(printable(obj))
    return Text(to_json(obj, indent=2))


def _json_default(o):
    if isinstance(o, bytes):
        try:
            return o.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(o).decode()}
    return str(o)


def to_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, indent=indent, default=_json_default)


def emit(console: Console, obj: Any, as_json: bool, renderable=None) -> None:
    """Print ``obj`` as JSON (``--json``) or as ``renderable`` (default: ``view(obj)``)."""
    if as_json:
        console.file.write(to_json(obj) + "\n")
        console.file.flush()
    else:
        if isinstance(renderable, str):          # plain text: no markup, no highlighting
            renderable = Text(renderable)
        console.print(renderable if renderable is not None else view(obj))


# -- views of particular calls ------------------------------------------------------------------
PS_COLS = ("pid", "ppid", "user", "state", "wait", "nice", "model", "tokens_in", "tokens_out", "kv_blocks",
           "kv_shared", "kv_swapped", "age_s")
SHARE_COLS = ("user", "share", "fraction", "tokens_served", "procs", "max_procs", "kv_blocks", "kv_quota")


def ps_view(rows: list[dict], shares: list[dict] | None = None):
    """Processes, then each user's share and holdings (a block shared by fork counts once)."""
    if not rows:
        return Text("no processes", style="dim")
    procs = table(rows, PS_COLS, formats={"age_s": lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "-",
                                          "wait": lambda v: v or ""})
    if not shares:
        return procs
    return Group(procs, shares_view(shares))


def shares_view(rows: list[dict]) -> Table:
    limit = lambda v: "-" if v is None else str(v)                                   # noqa: E731
    return table(rows, SHARE_COLS, title="users", formats={
        "share": lambda v: f"{v:g}", "fraction": lambda v: f"{100 * v:.0f}%", "max_procs": limit,
        "kv_quota": limit})


def free_view(free: dict) -> Table:
    cols = ("budget", "weights", "kv", "adapters", "reserve", "free")
    rows = [{"memory": where, **{c: human_bytes(part.get(c)) if c in part else "" for c in cols}}
            for where, part in free.items() if isinstance(part, dict)]
    return table(rows, ("memory", *cols))


def models_view(models: list[dict]):
    if not models:
        return Text("no models", style="dim")
    return table(models, ("name", "where", "architecture", "params", "dtype", "bytes", "kv_bytes", "pinned",
                          "processes", "last_used_s_ago"),
                 formats={"bytes": human_bytes, "kv_bytes": human_bytes,
                          "params": lambda v: f"{v:,}" if isinstance(v, int) else cell(v)})


def svc_view(rows: list[dict]):
    if not rows:
        return Text("no services", style="dim")
    return table(rows, ("name", "state", "pid", "restarts", "calls_served", "uptime_s", "calls"),
                 formats={"uptime_s": lambda v: f"{v:.0f}" if isinstance(v, (int, float)) else "-",
                          "calls": lambda v: str(len(v or []))})


def files_view(rows: list[dict]):
    if not rows:
        return Text("no files", style="dim")
    return table(rows, ("path", "size", "mtime", "sha256"),
                 formats={"size": human_bytes, "sha256": lambda v: (v or "")[:12],
                          "mtime": lambda v: _time(v)})


def _time(v) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v)) if isinstance(v, (int, float)) else "-"
