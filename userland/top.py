"""``top``: a live view of the kernel, refreshed about once a second.

Three steps, each testable alone: ``snapshot(client)`` gathers the data through the ABI (calls
a user may not make, or a kernel may not have, are left out); ``with_rates(prev, snap)`` adds
tokens/s from the deltas between two snapshots; ``render_top(snap)`` turns it into a rich
renderable. ``q`` or Ctrl-C leaves.
"""
from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llmos.syscalls.errors import SyscallError
from llmos.userland import render
from llmos.userland.sh_base import arg, command

WAITING = ("READY", "SWAPPED")          # runnable but not in the running batch: the queue


def _try(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except SyscallError as err:
        if err.errno in ("ECONNREFUSED", "ECONNRESET", "ETIMEDOUT"):
            raise
        return None                     # EPERM, ENOSYS, ENOENT (no models): not shown


def snapshot(c) -> dict:
    """Everything top shows, from one round of calls."""
    return {
        "time": time.time(),
        "mono": time.monotonic(),
        "ps": _try(c.ps, all=True) or [],
        "meminfo": _try(c.meminfo),
        "free": _try(c.free),
        "models": _try(c.models),
        "devinfo": _try(c.devinfo),
        "services": _try(c.svc_list),
        "alerts": _try(c.call, "alerts", _timeout=2.0),
        "stat": _try(c.stat),
        "shares": _try(c.shares, all=True),
    }


def with_rates(prev: dict | None, snap: dict) -> dict:
    """``snap`` with ``tok_s`` on each process (None without an earlier sample of it),
    ``tok_s_total`` and the queue depth."""
    dt = snap["mono"] - prev["mono"] if prev else 0.0
    before = {p["pid"]: p.get("tokens_out", 0) for p in (prev or {}).get("ps", [])}
    total = 0.0
    rows = []
    for p in snap["ps"]:
        rate = None
        if dt > 0 and p["pid"] in before:
            rate = max(0.0, (p.get("tokens_out", 0) - before[p["pid"]]) / dt)
            total += rate
        rows.append({**p, "tok_s": rate})
    gen = [((x or {}).get("stat") or {}).get("tokens_generated") for x in (prev, snap)]
    if dt > 0 and None not in gen:          # kernel-wide: counts processes reaped meanwhile too
        total = max(0.0, (gen[1] - gen[0]) / dt)
    states: dict[str, int] = {}
    for p in rows:
        states[p["state"]] = states.get(p["state"], 0) + 1
    alerts = snap.get("alerts")
    if isinstance(alerts, dict):            # the kernel's alerts call: {active: [...], events, ...}
        alerts = alerts.get("active")
    return {**snap, "ps": rows, "tok_s_total": total if dt > 0 else None, "states": states,
            "queue": sum(n for s, n in states.items() if s in WAITING), "alerts": alerts or []}


def _pct(x) -> str:
    return f"{100 * x:.0f}%" if isinstance(x, (int, float)) else "-"


def _summary(d: dict) -> Table:
    t = Table.grid(padding=(0, 3))
    mem, free, dev = d.get("meminfo") or {}, d.get("free") or {}, d.get("devinfo") or {}
    states = " ".join(f"{s.lower()} {n}" for s, n in sorted(d.get("states", {}).items())) or "none"
    rate = d.get("tok_s_total")
    line1 = [f"procs {len(d['ps'])} ({states})", f"queue {d.get('queue', 0)}",
             f"tokens/s {rate:.1f}" if rate is not None else "tokens/s -"]
    st = d.get("stat") or {}
    if st:
        line1.append(f"uptime {st.get('uptime_s', 0):.0f}s, {st.get('requests', 0)} calls, {st.get('errors', 0)} errors")
    t.add_row(Text("  ".join(line1)))
    if mem:
        t.add_row(Text(f"KV {mem.get('blocks_used', 0)}/{mem.get('blocks_total', 0)} blocks "
                       f"({_pct(mem.get('blocks_used', 0) / max(1, mem.get('blocks_total', 0)))}), shared {mem.get('blocks_shared', 0)}, "
                       f"cached {mem.get('blocks_cached', 0)}, swapped {mem.get('blocks_swapped', 0)}"
                       f"/{mem.get('host_blocks_total', 0)}"))
    if free.get("device"):
        dv, ho = free["device"], free.get("host") or {}
        t.add_row(Text(f"device: weights {render.human_bytes(dv.get('weights'))}, KV {render.human_bytes(dv.get('kv'))}, "
                       f"adapters {render.human_bytes(dv.get('adapters'))}, free {render.human_bytes(dv.get('free'))} "
                       f"of {render.human_bytes(dv.get('budget'))};  host: weights {render.human_bytes(ho.get('weights'))}, "
                       f"free {render.human_bytes(ho.get('free'))}"))
    if dev:
        tel = [f"{dev.get('kind', '?')} {dev.get('name', '')}".strip()]
        if dev.get("utilization_pct") is not None:
            tel.append(f"util {dev['utilization_pct']:.0f}%")
        if dev.get("used_bytes") is not None and dev.get("total_bytes"):
            tel.append(f"mem {render.human_bytes(dev['used_bytes'])}/{render.human_bytes(dev['total_bytes'])}")
        if dev.get("temperature_c") is not None:
            tel.append(f"{dev['temperature_c']:.0f}°C")
        if dev.get("power_w") is not None:
            tel.append(f"{dev['power_w']:.0f} W")
        t.add_row(Text("  ".join(tel)))
    return t


def render_top(d: dict):
    """One frame of top from ``with_rates`` data (pure: no I/O)."""
    parts = [Text(f"llmos top  {time.strftime('%H:%M:%S', time.localtime(d['time']))}   (q to quit)",
                  style="bold"), _summary(d)]
    for a in d.get("alerts") or []:
        style = {"critical": "bold red", "error": "red", "warning": "yellow"}.get(str(a.get("severity")), "cyan")
        parts.append(Text(f"ALERT [{a.get('severity')}] {a.get('name')}: {a.get('message')}", style=style))
    rows = sorted(d["ps"], key=lambda p: (p.get("state") not in ("RUNNING",), p.get("nice", 0), p["pid"]))
    procs = render.table(rows, ("pid", "user", "state", "nice", "model", "tokens_in", "tokens_out", "tok_s",
                                "kv_blocks", "age_s"),
                         formats={"tok_s": lambda v: f"{v:.1f}" if v is not None else "-",
                                  "age_s": lambda v: f"{v:.0f}" if isinstance(v, (int, float)) else "-"})
    parts.append(procs if rows else Text("no processes", style="dim"))
    shares = d.get("shares") or []
    if shares:
        parts.append(render.shares_view(shares))
    models = d.get("models") or []
    if models:
        parts.append(render.table(models, ("name", "where", "bytes", "processes", "pinned"), title="models",
                                  formats={"bytes": render.human_bytes}))
    services = d.get("services") or []
    if services:
        parts.append(render.table(services, ("name", "state", "pid", "restarts", "calls_served"), title="services"))
    return Group(*parts)


def _key_pressed(timeout: float) -> str | None:
    r, _, _ = select.select([sys.stdin], [], [], timeout)
    return os.read(sys.stdin.fileno(), 16).decode(errors="ignore") if r else None


def live(ctx, interval: float) -> None:
    c = ctx.client
    prev = snapshot(c)
    data = with_rates(None, prev)
    tty_in = sys.stdin.isatty()
    old = termios.tcgetattr(sys.stdin) if tty_in else None
    try:
        if tty_in:
            tty.setcbreak(sys.stdin.fileno())       # keys without Enter; Ctrl-C still interrupts
        with Live(render_top(data), console=ctx.console, refresh_per_second=4, screen=False,
                  transient=False) as view:
            while True:
                key = _key_pressed(interval) if tty_in else (time.sleep(interval) or None)
                if key and key.lower().startswith("q"):
                    break
                snap = snapshot(c)
                data, prev = with_rates(prev, snap), snap
                view.update(render_top(data))
    except KeyboardInterrupt:
        pass
    finally:
        if old is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, old)


@command("top", "A live view: processes, tokens/s, KV, weights, queue, device, services, alerts.",
         arg("--once", action="store_true", help="print one frame and exit"),
         arg("-d", "--interval", type=float, default=1.0, help="seconds between refreshes"))
def top(ctx, a):
    if a.once or ctx.as_json:
        first = snapshot(ctx.client)
        time.sleep(min(a.interval, 0.5))         # a second sample, for tokens/s
        data = with_rates(first, snapshot(ctx.client))
        ctx.out({k: v for k, v in data.items() if k != "mono"}, render_top(data))
        return
    live(ctx, a.interval)
