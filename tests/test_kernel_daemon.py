"""The daemon as a user meets it: llmos kernel start/stop/status, pidfile, signals, users."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import KernelProc
from llmos import connect


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


def test_tcp_on_loopback_works_and_other_interfaces_get_curve(start_kernel, tmp_path, monkeypatch):
    """Loopback TCP stays plain; any other address is served only over CURVE (with the local
    ipc socket beside it), and a clear-text endpoint on another interface is refused."""
    import socket as pysocket

    from llmos.kernel.curve import public_key

    def free_port():
        with pysocket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    k = start_kernel("--socket", f"tcp://127.0.0.1:{free_port()}")
    with k.client() as c:
        assert c.whoami()["user"] == "root"
    monkeypatch.setenv("LLMOS_CONFIG_DIR", str(tmp_path / "config"))
    port = free_port()
    remote = KernelProc("--socket", f"tcp://0.0.0.0:{port}")
    assert remote.socket.startswith("tcp://")
    remote.socket = f"ipc://{remote.state}/run/kernel.sock"          # where its local socket goes
    remote.start()
    try:
        assert f"tcp://0.0.0.0:{port} (CURVE" in remote.output()
        with remote.client() as local:
            assert local.whoami()["user"] == "root"
        with connect(f"tcp://127.0.0.1:{port}", remote.token, server_key=public_key(remote.state)) as c:
            assert c.whoami()["user"] == "root"
    finally:
        remote.cleanup()
    r = subprocess.run([sys.executable, "-m", "llmos.kernel", "--model", "none", "--state-dir", str(tmp_path / "s"),
                        "--socket", "tcp://0.0.0.0:5999", "--listen", "tcp://0.0.0.0:5998"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not also as --socket" in r.stderr


def _kernel_pid(state: Path) -> int | None:
    try:
        return int((state / "kernel.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def test_the_supervisor_restarts_a_crashed_kernel_and_its_processes_come_back(state):
    import signal
    import psutil
    from conftest import wait_for
    from llmos import connect
    from llmos.syscalls import locate
    r = llmos(state, "kernel", "start", "--no-services", "--device", "cpu", "--dtype", "float32")
    assert r.returncode == 0 and "supervisor pid" in r.stdout, r.stderr
    first = _kernel_pid(state)
    sock, token = locate.default_socket(state), locate.saved_token(state)
    with connect(sock, token) as c:
        pid = c.spawn(prompt="hello", max_tokens=8, stopped=True)
    os.kill(first, signal.SIGKILL)                         # a crash
    wait_for(lambda: _kernel_pid(state) not in (None, first) and locate.kernel_alive(_kernel_pid(state)),
             timeout=120)
    with connect(sock, token) as c:
        wait_for(lambda: _answers(c), timeout=120)
        assert c.pinfo(pid)["state"] == "STOPPED"          # restored from the journal
    supervisor = psutil.Process(psutil.Process(_kernel_pid(state)).ppid())
    assert "llmos.kernel.supervise" in " ".join(supervisor.cmdline())
    r = llmos(state, "kernel", "stop")
    assert r.returncode == 0 and "stopped" in r.stdout
    supervisor.wait(30)                                    # a clean stop ends the supervisor too


def _answers(c) -> bool:
    from llmos import SyscallError
    try:
        return bool(c.nop())
    except SyscallError:
        return False


def test_a_dead_pid_in_the_pidfile_does_not_block_a_start(state):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state.mkdir(parents=True, exist_ok=True)
    (state / "kernel.pid").write_text(f"{dead.pid}\nipc://nowhere\n")
    r = llmos(state, "kernel", "start", "--model", "none")
    assert r.returncode == 0, r.stderr


def test_services_exit_when_their_kernel_dies_and_the_next_kernel_gets_their_stores():
    import signal
    import psutil
    from conftest import wait_for
    k = KernelProc("--service", "kg").start()
    try:
        with k.client() as c:
            wait_for(lambda: any(s["name"] == "kg" and s["state"] == "up" for s in c.svc_list()), timeout=120)
            kg = next(s["pid"] for s in c.svc_list() if s["name"] == "kg")
            c.call("kg_add", triples=[["Ada", "works_at", "Acme"]])
        k.stop(signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(kg) or psutil.Process(kg).status() == psutil.STATUS_ZOMBIE,
                 timeout=10)                              # noticed within a heartbeat or so, not ~20 s
        k.start()
        with k.client() as c:
            wait_for(lambda: any(s["name"] == "kg" and s["state"] == "up" for s in c.svc_list()), timeout=120)
            assert c.call("kg_query", pattern=[["Ada", "works_at", "?x"]])
    finally:
        k.cleanup()
