"""The daemon as a user meets it: llmos kernel start/stop/status, pidfile, signals, users."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import KernelProc


def llmos(state: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMOS_STATE_DIR": str(state)}
    env.pop("LLMOS_SOCKET", None)
    env.pop("LLMOS_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "llmos.userland.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def state():
    d = Path(tempfile.mkdtemp(prefix="llmos-cli-"))
    yield d
    llmos(d, "kernel", "stop")


def test_cli_start_status_users_connect_and_stop(state):
    r = llmos(state, "kernel", "start", "--model", "none")
    assert r.returncode == 0, r.stderr
    assert "kernel started" in r.stdout and "root token" in r.stdout
    assert (state / "kernel.pid").exists() and (state / "kernel.log").exists()
    assert "running" in llmos(state, "kernel", "status").stdout
    # connect() with nothing set finds the local kernel and the saved token
    code = "from llmos import connect; print(connect().whoami()['user'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LLMOS_STATE_DIR": str(state)},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "root", out.stderr
    token = llmos(state, "user", "add", "dave").stdout.strip()
    assert token.startswith("llmos_") and "\n" not in token        # only the token, for scripts
    assert llmos(state, "user", "token", "dave").stdout.strip().startswith("llmos_")
    assert "dave" in llmos(state, "user", "list").stdout
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LLMOS_STATE_DIR": str(state), "LLMOS_TOKEN": token})
    assert out.stdout.strip() == "dave"
    # a second start on the same state dir and socket is refused
    r2 = llmos(state, "kernel", "start", "--model", "none")
    assert r2.returncode != 0 and "already running" in r2.stderr
    r = llmos(state, "kernel", "stop")
    assert r.returncode == 0 and "stopped" in r.stdout
    assert not (state / "kernel.pid").exists() and not (state / "run" / "kernel.sock").exists()
    assert llmos(state, "kernel", "status").returncode != 0


def test_sigterm_shuts_down_cleanly(kernel):
    assert kernel.stop() == 0
    assert not (kernel.state / "kernel.pid").exists()
    assert not (kernel.state / "run" / "kernel.sock").exists()
    assert "kernel down" in (kernel.state / "kernel.log").read_text()


def test_shutdown_is_admin_only_and_stops_the_kernel(kernel, root):
    tok = root.user_add("erin")["token"]
    from llmos import SyscallError
    with kernel.client(tok) as erin, pytest.raises(SyscallError):
        erin.shutdown()
    assert root.shutdown() is True
    assert kernel.proc.wait(30) == 0


def test_users_and_tokens_survive_a_restart(kernel, root):
    tok = root.user_add("frank")["token"]
    kernel.stop()
    k2 = KernelProc(state=kernel.state).start()
    try:
        with k2.client(tok) as c:
            assert c.whoami()["user"] == "frank"
    finally:
        k2.stop()


def test_cli_reports_errors_without_tracebacks(state):
    r = llmos(state, "ps")
    assert r.returncode == 1 and "ECONNREFUSED" in r.stderr and "Traceback" not in r.stderr
    r = llmos(state, "frobnicate")
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_tcp_on_loopback_works_and_other_interfaces_are_refused(start_kernel, tmp_path):
    import socket as pysocket
    with pysocket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    k = start_kernel("--socket", f"tcp://127.0.0.1:{port}")
    with k.client() as c:
        assert c.whoami()["user"] == "root"
    r = subprocess.run([sys.executable, "-m", "llmos.kernel", "--model", "none", "--state-dir", str(tmp_path),
                        "--socket", "tcp://0.0.0.0:5999"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "refusing" in r.stderr
