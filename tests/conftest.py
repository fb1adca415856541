"""Shared fixtures: a real kernel process on a temporary socket and state directory."""
from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when it is first imported, and torch imports it with
# transformers: choose the interpreter (CPU Triton tests) before any test module loads torch.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny models on a small shared machine: a second OpenMP thread only adds stalls (a tiny matmul
# takes milliseconds with two threads against microseconds with one). Kernels inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The load-time check remembers passes; the suite keeps its memory to itself (kernels inherit it).
os.environ.setdefault("LLMOS_SELFCHECK_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                            f"llmos-selfcheck-{os.getpid()}"))

import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llmos import SyscallError, connect
from llmos.syscalls import locate


def errno_of(fn, *args, **kwargs) -> str:
    """The errno a call is refused with (its message must say why)."""
    with pytest.raises(SyscallError) as e:
        fn(*args, **kwargs)
    assert e.value.message
    return e.value.errno


def wait_for(pred, timeout: float = 20.0, every: float = 0.05):
    """Poll ``pred`` until it returns something true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


class Endpoint:
    """What tests talk to (a kernel, a cluster's front): its socket and state directory give the
    saved root token and clients."""
    state: Path
    socket: str

    @property
    def token(self) -> str | None:
        return locate.saved_token(self.state)

    def client(self, token: str | None = None, timeout: float = 30.0):
        return connect(self.socket, token or self.token, timeout=timeout)


class KernelProc(Endpoint):
    """A kernel started as ``python -m llmos.kernel`` with its own state directory."""

    def __init__(self, *args: str, model: str = "none", state: Path | None = None):
        # ipc paths are limited to 107 bytes, so keep state directories short.
        self.state = state or Path(tempfile.mkdtemp(prefix="llmos-"))
        self.socket = args[args.index("--socket") + 1] if "--socket" in args else locate.default_socket(self.state)
        lean = () if "--service" in args else ("--no-services",)     # services only where a test asks
        self.args = ["--state-dir", str(self.state), "--model", model, *lean, *args]
        self.proc = None

    def start(self, timeout: float = 120.0) -> "KernelProc":
        self.log = open(self.state / "test-kernel.out", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "llmos.kernel", *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kernel exited {self.proc.returncode}:\n{self.output()}")
            if self.token and (not locate.is_ipc(self.socket) or os.path.exists(locate.ipc_path(self.socket))):
                try:
                    with self.client(timeout=1.0) as c:
                        c.nop()
                    return self
                except Exception:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"kernel did not come up:\n{self.output()}")

    def output(self) -> str:
        return (self.state / "test-kernel.out").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        self.log.close()
        shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture
def start_kernel():
    """Factory: ``start_kernel("--rate-limit", "100", model="none")`` -> a running KernelProc."""
    started: list[KernelProc] = []

    def start(*args: str, model: str = "none", **kw) -> KernelProc:
        k = KernelProc(*args, model=model, **kw)
        started.append(k)
        return k.start()

    yield start
    for k in started:
        k.cleanup()


@pytest.fixture
def kernel(start_kernel) -> KernelProc:
    """A model-less kernel: the ABI, users and security without loading torch models."""
    return start_kernel()


@pytest.fixture
def root(kernel):
    with kernel.client() as c:
        yield c
