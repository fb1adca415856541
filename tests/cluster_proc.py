"""A real cluster for tests: ``llmos cluster up`` on a local Ray cluster of its own, torn down
with ``llmos cluster down`` (and, should that fail, by killing what it started)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import Endpoint
from llmos.syscalls import locate

LLMOS = [sys.executable, "-m", "llmos.userland.cli"]


class ClusterProc(Endpoint):
    def __init__(self, *args: str, kernels: int = 2):
        self.state = Path(tempfile.mkdtemp(prefix="llmos-c-"))
        self.env = {**os.environ, "LLMOS_STATE_DIR": str(self.state)}
        self.env.pop("LLMOS_SOCKET", None)
        self.env.pop("LLMOS_TOKEN", None)
        self.args = ["--kernels", str(kernels), *args]
        self.socket = locate.default_socket(self.state)

    def llmos(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*LLMOS, *argv], env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def start(self) -> "ClusterProc":
        done = self.llmos("cluster", "up", *self.args)
        if done.returncode != 0:
            self.cleanup()
            raise RuntimeError(f"cluster up failed:\n{done.stdout}\n{done.stderr}")
        return self

    def client(self, token: str | None = None, timeout: float = 120.0):
        return super().client(token, timeout)

    def info(self) -> dict:
        try:
            return json.loads((self.state / "cluster.json").read_text())
        except (OSError, ValueError):
            return {}

    def cleanup(self) -> None:
        info = self.info()
        try:
            self.llmos("cluster", "down", timeout=300)
        except subprocess.TimeoutExpired:
            pass
        for key in ("front_pid", "ray_head_pid"):        # whatever down could not stop
            if info.get(key):
                try:
                    os.killpg(info[key], signal.SIGKILL) if key == "ray_head_pid" else os.kill(info[key], signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        shutil.rmtree(self.state, ignore_errors=True)
