"""The ``llmos`` command.

    llmos kernel start [--foreground] [--socket S] [--state-dir D] [kernel options]
    llmos kernel stop | status
    llmos user add NAME [--caps proc,mm,...] | token NAME | list
    llmos uname | whoami | stat | ps [--all] [--json] | meminfo | devinfo
    llmos call NAME [key=value ...]     (any syscall; values are JSON, else strings)
    llmos demo

Userland: it talks to the kernel only through the ABI, and starts the kernel as its own
process (``python -m llmos.kernel``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llmos.syscalls import locate
from llmos.syscalls.client import connect
from llmos.syscalls.errors import SyscallError


def _state_and_socket(argv: list[str]) -> tuple[Path, str]:
    def opt(name):
        for i, a in enumerate(argv):
            if a == name and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
        return None
    state = Path(opt("--state-dir")).expanduser() if opt("--state-dir") else locate.state_dir()
    return state, opt("--socket") or os.environ.get("LLMOS_SOCKET") or locate.default_socket(state)


def kernel_start(argv: list[str]) -> int:
    state, socket = _state_and_socket(argv)
    cmd = [sys.executable, "-m", "llmos.kernel", *[a for a in argv if a != "--foreground"]]
    if "--foreground" in argv:
        os.execv(sys.executable, cmd)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = open(state / "kernel.out", "ab")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    first_boot = not (state / locate.TOKEN_NAME).exists()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"llmos: kernel failed to start (exit {proc.returncode}); see {state / 'kernel.out'}:",
                  file=sys.stderr)
            print(_tail(state / "kernel.out"), file=sys.stderr)
            return 1
        token = locate.saved_token(state)
        if token and _pid_of(state) == proc.pid:     # our child owns the pidfile: ask it
            try:
                with connect(socket, token, timeout=1.0) as c:
                    c.nop()
                break
            except SyscallError:
                pass
        time.sleep(0.1)
    else:
        print("llmos: kernel did not answer within 300 s", file=sys.stderr)
        return 1
    print(f"kernel started (pid {proc.pid}) on {socket}")
    if first_boot:
        print(f"root token (shown once; saved to {state / locate.TOKEN_NAME}):\n{locate.saved_token(state)}")
    return 0


def kernel_stop(argv: list[str]) -> int:
    state, socket = _state_and_socket(argv)
    pid = _pid_of(state)
    try:
        with connect(socket, locate.saved_token(state), timeout=5.0) as c:
            c.shutdown()
    except SyscallError as err:
        if pid is None:
            print(f"llmos: no kernel running ({err.message})", file=sys.stderr)
            return 1
        if _alive(pid):
            os.kill(pid, 15)  # the kernel doesn't answer: SIGTERM stops it cleanly too
    for _ in range(300):
        if pid is None or not _alive(pid):
            print("kernel stopped")
            return 0
        time.sleep(0.1)
    print(f"llmos: kernel (pid {pid}) still running after 30 s", file=sys.stderr)
    return 1


def kernel_status(argv: list[str]) -> int:
    state, socket = _state_and_socket(argv)
    try:
        with connect(socket, locate.saved_token(state), timeout=3.0) as c:
            u, s = c.uname(), c.stat()
    except SyscallError as err:
        print(f"kernel: not running ({err.message})")
        return 1
    models = ", ".join(m["name"] + (" (random weights)" if m.get("random_weights") else "")
                       for m in u["models"]) or "none"
    print(f"kernel: running (pid {_pid_of(state)}) on {socket}\n  llmos {u['version']} abi {u['abi']} "
          f"device {u['device']}\n  models: {models}\n  uptime {s['uptime_s']:.0f}s, "
          f"{s['requests']} requests, {s['errors']} errors, processes {s['procs']}")
    return 0


def _pid_of(state: Path) -> int | None:
    try:
        return int((state / "kernel.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _parse_value(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


def _print(obj, as_json: bool) -> None:
    if as_json or not isinstance(obj, list) or not obj or not isinstance(obj[0], dict):
        print(json.dumps(obj, indent=None if as_json else 2))
        return
    cols = list(obj[0])
    rows = [[str(r.get(c, "")) for c in cols] for r in obj]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    as_json = "--json" in rest
    rest = [a for a in rest if a != "--json"]
    try:
        if cmd == "kernel":
            sub = rest[0] if rest else "status"
            return {"start": kernel_start, "stop": kernel_stop, "status": kernel_status}.get(
                sub, lambda a: _usage(f"unknown: kernel {sub}"))(rest[1:])
        if cmd == "demo":
            from llmos.userland.demo import main as demo
            return demo(rest)
        with connect() as c:
            if cmd == "user" and rest[:1] == ["add"] and len(rest) >= 2:
                caps = rest[rest.index("--caps") + 1].split(",") if "--caps" in rest else None
                r = c.user_add(rest[1], caps=caps)
                print(r["token"])
            elif cmd == "user" and rest[:1] == ["token"] and len(rest) == 2:
                print(c.user_token(rest[1])["token"])
            elif cmd == "user" and rest[:1] == ["list"]:
                _print(c.user_list(), as_json)
            elif cmd in ("uname", "whoami", "stat", "meminfo", "devinfo"):
                _print(c.call(cmd), as_json)
            elif cmd == "ps":
                _print(c.ps(all="--all" in rest), as_json)
            elif cmd == "call" and rest:
                args = dict(a.split("=", 1) for a in rest[1:] if "=" in a)
                _print(c.call(rest[0], **{k: _parse_value(v) for k, v in args.items()}), as_json)
            else:
                return _usage(f"unknown command: {' '.join(argv)}")
    except SyscallError as err:
        print(f"llmos: {err}", file=sys.stderr)
        return 1
    return 0


def _usage(msg: str) -> int:
    print(f"llmos: {msg}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
