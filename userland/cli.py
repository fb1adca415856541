"""The ``llmos`` command.

    llmos                               the interactive shell (also: llmos shell)
    llmos kernel start [--foreground | --no-supervise] [--socket S] [--state-dir D] [kernel options]
    llmos kernel stop [--drain | --discard] | status | key     (key: the public key remote clients need)
    llmos cluster up [--kernels N | --per-gpu] [--address A] [kernel options] | status | drain K | add [N] | down
    llmos user add NAME [--caps proc,mm,...] | token NAME | key add|rm NAME FILE | list
    llmos remote add NAME tcp://HOST:PORT --server-key KEY --token-file F | list | rm NAME
    llmos --remote NAME COMMAND ...     (any command, the shell too, against a saved remote kernel)
    llmos audit [--since 1h] [--user NAME] [--event KIND]
    llmos ps [--all] | top [--once] | free | models | load NAME | unload NAME | svc list|start|stop
    llmos spawn PROMPT | chat [MODEL] | kill | stop | cont | nice | fork | wait | read | write | pinfo
    llmos ls | cat | put | get | rm      (the file store)
    llmos kg add|query|path|search ...  (the knowledge graph)
    llmos tune submit|status|list|cancel | feedback PID RATING [CORRECTION]
    llmos uname | whoami | stat | meminfo | devinfo
    llmos call NAME [key=value ...]     (any call; values are JSON, else strings)
    llmos run PROGRAM.py [args]         (with LLMOS_SOCKET/LLMOS_TOKEN set for llmos.connect())
    llmos serve-http [args]             (the OpenAI-compatible gateway)
    llmos demo
    llmos help [COMMAND]                (every command; --json prints a command's result as JSON)

The shell and the one-shot commands share one command table (``llmos.userland.sh_base``).
Userland talks to the kernel only through the ABI, and starts the kernel as its own process
(``python -m llmos.kernel``).
"""
from __future__ import annotations

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
    socket = opt("--socket") or os.environ.get("LLMOS_SOCKET") or locate.default_socket(state)
    if socket.startswith("tcp://") and not locate.is_loopback(socket):
        socket = locate.default_socket(state)      # served over CURVE; the local socket is the ipc one
    return state, socket


def kernel_start(argv: list[str]) -> int:
    """Start the kernel in the background under its supervisor (``kernel.supervise``: restarted
    after a crash, its processes restored); ``--foreground`` runs it here, ``--no-supervise``
    without the supervisor."""
    state, socket = _state_and_socket(argv)
    args = [a for a in argv if a not in ("--foreground", "--no-supervise")]
    if "--foreground" in argv:
        os.execv(sys.executable, [sys.executable, "-m", "llmos.kernel", *args])
    supervised = "--no-supervise" not in argv
    cmd = [sys.executable, "-m", "llmos.kernel.supervise" if supervised else "llmos.kernel", *args]
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
        token, kernel_pid = locate.saved_token(state), _pid_of(state)
        if token and kernel_pid and _started_by(kernel_pid, proc.pid, supervised):   # ours: ask it
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
    listen = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--listen"), None)
    print(f"kernel started (pid {kernel_pid}" + (f", supervisor pid {proc.pid}" if supervised else "")
          + f") on {socket}" + (f" and {listen} (CURVE; `llmos kernel key` prints its public key)" if listen else ""))
    if first_boot:
        print(f"root token (shown once; saved to {state / locate.TOKEN_NAME}):\n{locate.saved_token(state)}")
    return 0


def kernel_stop(argv: list[str]) -> int:
    """Stop the kernel; its processes come back at the next start (the journal), unless
    ``--discard``; ``--drain`` first lets the non-interactive ones finish."""
    state, socket = _state_and_socket(argv)
    pid = _pid_of(state)
    mode = "drain" if "--drain" in argv else "discard" if "--discard" in argv else "checkpoint"
    try:
        with connect(socket, locate.saved_token(state), timeout=5.0) as c:
            c.shutdown(mode=mode)
    except SyscallError as err:
        if pid is None:
            print(f"llmos: no kernel running ({err.message})", file=sys.stderr)
            return 1
        if _alive(pid):
            os.kill(pid, 15)  # the kernel doesn't answer: SIGTERM stops it cleanly too
    limit = 3600 if mode == "drain" else 30
    for _ in range(limit * 10):
        if pid is None or not _alive(pid):
            print("kernel stopped" + ("; its processes were dropped" if mode == "discard" else
                                      "; its processes come back at the next start"))
            return 0
        time.sleep(0.1)
    print(f"llmos: kernel (pid {pid}) still running after {limit} s", file=sys.stderr)
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


def _started_by(kernel_pid: int, pid: int, supervised: bool) -> bool:
    """Whether the kernel in the pidfile is the one ``pid`` started (itself, or its child)."""
    import psutil
    if not supervised:
        return kernel_pid == pid
    try:
        return psutil.Process(kernel_pid).ppid() == pid
    except psutil.Error:
        return False


def _alive(pid: int) -> bool:
    return locate.kernel_alive(pid)


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    argv = _take_remote(argv)
    cmd, rest = (argv[0], argv[1:]) if argv else ("shell", [])
    if cmd == "kernel":
        sub = rest[0] if rest else "status"
        return {"start": kernel_start, "stop": kernel_stop, "status": kernel_status, "key": kernel_key}.get(
            sub, lambda a: _usage(f"unknown: kernel {sub}"))(rest[1:])
    if cmd == "cluster":
        from llmos.userland.cli_cluster import main as cluster
        return cluster(rest)
    if cmd == "demo":
        from llmos.userland.demo import main as demo
        return demo(rest)
    if cmd == "serve-http":
        from llmos.userland.gateway import main as gateway     # written separately; imported on use
        return gateway(rest) or 0
    if cmd in ("shell", "sh"):
        from llmos.userland.shell import Shell
        return Shell().loop()
    from llmos.userland.sh_base import Ctx, load_commands, run_command
    load_commands()
    try:
        return run_command(Ctx(), argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:                       # `llmos ps | head`
        return 0
    except Exception as err:                      # a bug: one line (LLMOS_DEBUG=1 shows the traceback)
        if os.environ.get("LLMOS_DEBUG"):
            raise
        print(f"llmos: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def _take_remote(argv: list[str]) -> list[str]:
    """``llmos --remote NAME …`` and ``llmos shell --remote NAME``: talk to a saved remote
    (``connect()`` reads ``$LLMOS_REMOTE``)."""
    at = 0 if argv[:1] == ["--remote"] else 1 if argv[:1] in (["shell"], ["sh"]) and argv[1:2] == ["--remote"] else None
    if at is None:
        return argv
    if len(argv) < at + 2:
        raise SystemExit("llmos: --remote needs a NAME (llmos remote list shows them)")
    os.environ["LLMOS_REMOTE"] = argv[at + 1]
    os.environ.pop("LLMOS_SOCKET", None)
    return argv[:at] + argv[at + 2:]


def kernel_key(argv: list[str]) -> int:
    from llmos.kernel.curve import public_key
    state, _ = _state_and_socket(argv)
    key = public_key(state)
    if key is None:
        print(f"llmos: no kernel key in {state}/keys yet (a kernel makes it at its first boot)", file=sys.stderr)
        return 1
    print(key)
    return 0


def _usage(msg: str) -> int:
    print(f"llmos: {msg}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
