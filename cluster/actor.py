"""A kernel as a Ray actor: ``KernelActor`` starts and watches one ordinary llmos kernel process.

The kernel is the same program as ``llmos kernel start`` (``python -m llmos.kernel``), run as
the actor's child with its own state directory, a local ipc socket and a CURVE TCP endpoint on
the node's address, so the front reaches it from any node. The front's client key is trusted to
check users' registered keys itself (``--trusted-key``). Kernel 0, the head, keeps the
cluster's own state directory (its users, files, graph and token: a single kernel's state
becomes a cluster's as it is) with its socket at ``run/head.sock``, since the front serves the
usual one; kernel N>0 keeps ``<root>/kernels/N``.

The actor's life is the kernel's: if the kernel exits unasked, the actor exits too and Ray
restarts it (``max_restarts``), which boots the kernel again on the same state directory, so
its journal brings its processes back. If the actor dies (``ray.kill``, a lost node), the
kernel dies with it (``PR_SET_PDEATHSIG``). ``watch`` returns only when the kernel has exited:
the front holds one call of it per kernel, and Ray tells it of the death at once.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = "llmos: kernel ready"
BOOT_TIMEOUT = 300.0


def _die_with_parent() -> None:
    """In the child: SIGKILL when the actor process dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()


def _without_services(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--service":
            skip = True
        elif not (a.startswith("--service=") or a == "--no-services"):
            out.append(a)
    return out


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class KernelActor:
    """One kernel process, started in ``__init__`` and ready when it returns."""

    def __init__(self, kernel_id: int, root: str, args: list[str], front_key: str, env: dict | None = None):
        import ray
        self.kernel_id, self.stopping = kernel_id, False
        self.state = Path(root) if kernel_id == 0 else Path(root) / "kernels" / str(kernel_id)
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket = f"ipc://{self.state / 'run' / ('head.sock' if kernel_id == 0 else 'kernel.sock')}"
        ctx = ray.get_runtime_context()
        self.node_id, self.host = ctx.get_node_id(), ray.util.get_node_ip_address()
        self.restarts = 1 if ctx.was_current_actor_reconstructed else 0
        self.listen = f"tcp://{self.host}:{free_port(self.host)}"
        self.log = self.state / f"kernel-{kernel_id}.out"
        if kernel_id != 0:                 # services (files, graph, tuner) run once, with the head
            args = _without_services(args) + ["--no-services"]
        cmd = [sys.executable, "-m", "llmos.kernel", "--state-dir", str(self.state), "--socket", self.socket,
               "--listen", self.listen, "--trusted-key", front_key, *args]
        child_env = {**os.environ, **(env or {}), "LLMOS_STATE_DIR": str(self.state)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=child_env, preexec_fn=_die_with_parent)
        self._wait_ready()
        self.exited = threading.Event()
        threading.Thread(target=self._reap, daemon=True).start()

    def _wait_ready(self) -> None:
        start, deadline = self.log.stat().st_size, time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[start:].decode(errors="replace")
            if READY in text:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"kernel {self.kernel_id} exited at boot ({self.proc.returncode}):\n{text[-2000:]}")
            time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"kernel {self.kernel_id} not ready after {BOOT_TIMEOUT:.0f} s")

    def _reap(self) -> None:
        self.proc.wait()
        self.exited.set()
        if not self.stopping:          # died unasked: so does the actor, and Ray restarts it
            os._exit(1)

    def info(self) -> dict:
        """Where the kernel is and how to speak to it (its public key, root's token at its
        first boot: the front replaces its users with the head's)."""
        from llmos.kernel import curve
        token = (self.state / "token").read_text().strip() if (self.state / "token").exists() else None
        return {"kernel": self.kernel_id, "node": self.node_id, "host": self.host, "listen": self.listen,
                "socket": self.socket, "server_key": curve.public_key(self.state), "token": token, "pid": self.proc.pid,
                "restarted": bool(self.restarts), "state_dir": str(self.state)}

    def watch(self) -> int:
        """Return the kernel's exit status when it exits (held by the front: a death signal)."""
        self.exited.wait()
        return self.proc.returncode

    def stop(self, mode: str = "checkpoint", token: str | None = None, timeout: float = 120.0) -> int:
        """Stop the kernel cleanly: ``checkpoint`` (SIGTERM: its live processes wait in its journal
        for its next boot), or ``drain``/``discard`` (its ``shutdown`` call, with root's token)."""
        self.stopping = True
        if self.proc.poll() is None:
            if mode == "checkpoint" or token is None:
                self.proc.terminate()
            else:
                from llmos.syscalls.client import connect
                with connect(self.socket, token, timeout=timeout) as c:
                    c.call("shutdown", mode=mode)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
