"""Remote access (issue 15): the ABI over CURVE-encrypted TCP — handshake errors, registered
client keys, a relay that sees nothing in clear — and named remotes in the CLI. The kernel binds
127.0.0.1 but serves it through the non-loopback path (``--listen``: CURVE on)."""
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from conftest import KernelProc, errno_of, wait_for
from fixtures_models import prompt_of, tiny_models  # noqa: F401
from llmos import SyscallError, connect
from llmos.kernel.curve import public_key
from llmos.syscalls import abi, remote

ARGS = ("--device", "cpu", "--dtype", "float32", "--kv-blocks", "64", "--block-size", "4")


def cli(*args: str, **env) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "llmos.userland.cli", *args], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("config")
    old = os.environ.get("LLMOS_CONFIG_DIR")
    os.environ["LLMOS_CONFIG_DIR"] = str(d)          # this client's key pair and remotes
    yield d
    os.environ.pop("LLMOS_CONFIG_DIR") if old is None else os.environ.__setitem__("LLMOS_CONFIG_DIR", old)


@pytest.fixture(scope="module")
def kernel(tiny_models, config_dir):
    port = free_port()
    k = KernelProc(*ARGS, "--listen", f"tcp://127.0.0.1:{port}", "--service", "fs",
                   model=tiny_models["llama"]).start()
    k.tcp, k.key = f"tcp://127.0.0.1:{port}", public_key(k.state)
    with k.client() as c:
        wait_for(lambda: any(s["name"] == "fs" and s["state"] == "up" for s in c.svc_list()))
    yield k
    k.cleanup()


def test_the_right_key_and_token_work_for_calls_streams_fork_and_services(kernel):
    assert kernel.key and len(kernel.key) == 40
    for f in ("server.key", "server.key_secret"):
        assert oct((kernel.state / "keys" / f).stat().st_mode & 0o777) == "0o600"
    with connect(kernel.tcp, kernel.token, server_key=kernel.key) as c:
        assert c.whoami()["user"] == "root"
        pid = c.spawn(prompt_ids=prompt_of(6), max_tokens=6, ignore_eos=True, stopped=True)
        (child,) = c.fork(pid, n=1)
        c.kill(pid, "CONT")
        streamed = [t for f in c.read(pid) for t in f["token_ids"]]
        assert c.wait(pid)["token_ids"] == streamed and len(streamed) == 6
        assert len(c.wait(child)["token_ids"]) == 6
        c.call("fs_put", path="remote.txt", data=b"over curve")
        assert c.call("fs_get", path="remote.txt") == b"over curve"


def test_a_plain_dealer_gets_nothing_and_disturbs_nobody(kernel):
    plain = zmq.Context.instance().socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(kernel.tcp)
    try:
        plain.send(abi.encode_request(1, "whoami", {}, kernel.token, None))
        with connect(kernel.tcp, kernel.token, server_key=kernel.key) as c:
            assert c.whoami()["user"] == "root"              # served while the plain one waits
        assert not plain.poll(1000)
    finally:
        plain.close(0)


def test_a_wrong_server_key_or_no_kernel_is_a_clear_error_not_a_hang(kernel):
    wrong = zmq.curve_keypair()[0].decode()
    t0 = time.monotonic()
    with pytest.raises(SyscallError, match="server key is not that kernel's") as e:
        connect(kernel.tcp, kernel.token, server_key=wrong)
    assert e.value.errno == "ECONNREFUSED" and time.monotonic() - t0 < remote.HANDSHAKE_TIMEOUT + 3
    with pytest.raises(SyscallError, match="no CURVE handshake"):
        connect(f"tcp://127.0.0.1:{free_port()}", kernel.token, server_key=kernel.key)
    with pytest.raises(SyscallError, match="public key"):           # another machine, no key given
        connect("tcp://192.0.2.1:5555", kernel.token)
    with connect(kernel.tcp, "not-a-token", server_key=kernel.key) as bad:
        with pytest.raises(SyscallError, match="bad token"):          # the key alone is not enough
            bad.whoami()


def test_only_a_registered_key_may_speak_for_a_user_that_has_one(kernel, tmp_path):
    with kernel.client() as root:
        token = root.user_add("keyed")["token"]
        zmq.auth.create_certificates(str(tmp_path), "mine")
        zmq.auth.create_certificates(str(tmp_path), "other")
        mine = remote.public_key_text(str(tmp_path / "mine.key"))
        assert root.user_key("keyed", mine)["keys"] == [mine]
        with pytest.raises(SyscallError, match="Z85"):
            root.user_key("keyed", "short")
        other = connect(kernel.tcp, token, server_key=kernel.key, client_key=str(tmp_path / "other.key_secret"))
        with other, pytest.raises(SyscallError, match="may not speak for user keyed") as e:
            other.whoami()
        assert e.value.errno == "EPERM"
        with connect(kernel.tcp, token, server_key=kernel.key, client_key=str(tmp_path / "mine.key_secret")) as c:
            assert c.whoami()["user"] == "keyed"
        with kernel.client(token) as local:                            # the local socket is not affected
            assert local.whoami()["user"] == "keyed"
        root.user_key("keyed", mine, remove=True)
        with connect(kernel.tcp, token, server_key=kernel.key, client_key=str(tmp_path / "other.key_secret")) as c:
            assert c.whoami()["user"] == "keyed"                      # no keys left: any key again


class Relay:
    """A TCP byte relay that keeps everything it carries."""

    def __init__(self, target_port: int):
        self.seen, self.target = bytearray(), target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                a, _ = self.server.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_a_relay_between_client_and_kernel_sees_no_token_and_no_prompt(kernel):
    relay = Relay(int(kernel.tcp.rsplit(":", 1)[1]))
    secret_prompt = "the launch code is swordfish"
    try:
        with connect(f"tcp://127.0.0.1:{relay.port}", kernel.token, server_key=kernel.key) as c:
            pid = c.spawn(prompt=secret_prompt, max_tokens=4, ignore_eos=True)
            text = c.wait(pid)["text"]
            c.call("fs_put", path="clear.txt", data=secret_prompt.encode())
        assert len(relay.seen) > 500                                    # it carried the conversation
        for clear in (kernel.token.encode(), secret_prompt.encode(), b"swordfish", b"whoami", b"spawn"):
            assert clear not in relay.seen
        if len(text) >= 8:
            assert text.encode() not in relay.seen
    finally:
        relay.server.close()


def test_named_remotes_in_the_cli(kernel, config_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(kernel.token)
    env = {"LLMOS_CONFIG_DIR": str(config_dir), "LLMOS_SOCKET": "ipc:///nowhere/kernel.sock", "LLMOS_TOKEN": "x"}
    r = cli("remote", "add", "lab", kernel.tcp, "--server-key", kernel.key, "--token-file", str(token_file), **env)
    assert r.returncode == 0 and "remote lab" in r.stdout, r.stderr
    assert oct((config_dir / "remotes.json").stat().st_mode & 0o777) == "0o600"
    listed = cli("remote", "list", **env).stdout
    assert "lab" in listed and kernel.token not in listed
    r = cli("--remote", "lab", "whoami", "--json", **env)
    assert r.returncode == 0 and '"root"' in r.stdout, r.stderr
    with connect(remote="lab") as c:
        assert c.whoami()["user"] == "root"
    r = cli("--remote", "nope", "whoami", **env)
    assert r.returncode != 0 and "no remote named 'nope'" in r.stdout + r.stderr
    assert cli("kernel", "key", "--state-dir", str(kernel.state)).stdout.strip() == kernel.key
    assert cli("remote", "rm", "lab", **env).returncode == 0 and "lab" not in cli("remote", "list", **env).stdout


def test_remote_option_is_taken_from_any_command_and_the_shell():
    from llmos.userland.cli import _take_remote
    saved = os.environ.get("LLMOS_REMOTE")
    try:
        assert _take_remote(["--remote", "lab", "ps", "--all"]) == ["ps", "--all"]
        assert os.environ["LLMOS_REMOTE"] == "lab"
        assert _take_remote(["shell", "--remote", "b"]) == ["shell"] and os.environ["LLMOS_REMOTE"] == "b"
        assert _take_remote(["ps"]) == ["ps"]
    finally:
        os.environ.pop("LLMOS_REMOTE", None) if saved is None else os.environ.__setitem__("LLMOS_REMOTE", saved)


def test_a_plugin_hosted_elsewhere_attaches_over_curve_and_serves(kernel, config_dir):
    with kernel.client() as root:
        token = root.svc_attach("echo")["token"]
        assert errno_of(root.svc_attach, "fs") == "EINVAL"                   # built-ins run in the kernel
        env = {**os.environ, "LLMOS_SOCKET": kernel.tcp, "LLMOS_SERVER_KEY": kernel.key,
               "LLMOS_SERVICE_TOKEN": token, "LLMOS_SERVICE_ATTACHED": "1"}
        host = subprocess.Popen([sys.executable, "-m", "llmos.services.run", "echo"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: any(s["name"] == "echo" and s["state"] == "up" for s in root.svc_list()), timeout=60)
            assert root.call("echo", text="from afar")["text"] == "from afar"
            assert list(root.stream("echo_count", n=3)) == [0, 1, 2, None]
            root.svc_stop("echo")                                            # its token is dropped: it exits
            assert host.wait(timeout=30) == 0
            assert errno_of(root.call, "echo", text="x") in ("ENOSYS", "EAGAIN")
        finally:
            if host.poll() is None:
                host.kill()
