"""Where the local kernel lives: its state directory, socket and the local user's token.

Shared by the kernel (which creates them) and clients (which find them), so both agree.
"""
from __future__ import annotations

import os
from pathlib import Path

SOCKET_NAME = "kernel.sock"
TOKEN_NAME = "token"
MAX_IPC_PATH = 107       # sun_path limit on Linux, less the terminating NUL


def state_dir() -> Path:
    return Path(os.environ.get("LLMOS_STATE_DIR") or Path.home() / ".llmos").expanduser()


def default_socket(state: Path | None = None) -> str:
    return "ipc://" + str((state or state_dir()) / "run" / SOCKET_NAME)


def saved_token(state: Path | None = None) -> str | None:
    """The token saved for the local user (root's, written at first boot), if readable."""
    try:
        return ((state or state_dir()) / TOKEN_NAME).read_text().strip() or None
    except OSError:
        return None


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(endpoint: str) -> bool:
    """A ``tcp://`` endpoint on this machine only (served in clear; others need CURVE)."""
    return endpoint.startswith("tcp://") and endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]") in LOOPBACK_HOSTS


def is_ipc(endpoint: str) -> bool:
    return endpoint.startswith("ipc://")


def ipc_path(endpoint: str) -> str:
    return endpoint[len("ipc://"):]


def kernel_alive(pid: int) -> bool:
    """Whether ``pid`` is a running llmos kernel: a live process (not a zombie waiting to be
    reaped, not a process that reused the pid of a dead kernel) running ``llmos.kernel``."""
    import psutil
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return any("llmos.kernel" in part for part in proc.cmdline())
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:        # another user's process: assume it is one
        return True
