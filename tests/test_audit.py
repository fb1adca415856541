"""The audit trail (issue 15): one JSON line per security event, each kind tested, readable by
root (``audit``, ``llmos audit``) and never holding a token or a secret key."""
import json
import os
import signal
import subprocess
import sys

import pytest
import zmq
import zmq.auth

from conftest import KernelProc, errno_of, wait_for
from fixtures_models import prompt_of, tiny_models  # noqa: F401
from llmos import SyscallError, connect
from llmos.syscalls import remote
from test_driver_lora import adapter_of  # noqa: F401
from test_remote import config_dir, free_port  # noqa: F401

ARGS = ("--device", "cpu", "--dtype", "float32", "--kv-blocks", "64", "--block-size", "4",
        "--max-procs-per-user", "1", "--service", "fs")


def test_every_kind_of_event_is_recorded_without_secrets(tiny_models, adapter_of, config_dir, tmp_path):
    port = free_port()
    k = KernelProc(*ARGS, "--listen", f"tcp://127.0.0.1:{port}", model=tiny_models["llama"]).start()
    try:
        root = k.client()
        wait_for(lambda: any(s["name"] == "fs" and s["state"] == "up" for s in root.svc_list()))
        with connect(k.socket, "llmos_forged") as forged:
            assert errno_of(forged.whoami) == "EACCES"                          # auth_failed
        alice_token = root.user_add("alice")["token"]                           # user_add
        alice = k.client(alice_token)
        assert errno_of(alice.user_list) == "EPERM"                             # cap_refused
        second = root.user_token("alice")["token"]                              # user_token
        root.user_set("alice", share=2.0)                                       # user_set
        pid = alice.spawn(prompt_ids=prompt_of(5), max_tokens=4, stopped=True)
        assert errno_of(alice.spawn, prompt_ids=prompt_of(5), max_tokens=4) == "EAGAIN"   # quota_refused
        root.kill(pid, "KILL")                                                  # signal_other
        root.wait(pid)
        root.wait(root.spawn(prompt_ids=prompt_of(5), max_tokens=2, adapter=adapter_of("llama", "A")))  # adapter_load
        zmq.auth.create_certificates(str(tmp_path), "alice")
        key = remote.public_key_text(str(tmp_path / "alice.key"))
        root.user_key("alice", key)                                             # user_key_add
        unregistered = connect(f"tcp://127.0.0.1:{port}", alice_token,          # a key file works too
                               server_key=str(k.state / "keys" / "server.key"))
        with unregistered, pytest.raises(SyscallError, match="may not speak"):  # key_refused
            unregistered.whoami()
        root.user_key("alice", key, remove=True)                                # user_key_rm
        with pytest.raises(SyscallError, match="handshake"):                    # handshake_failed
            connect(f"tcp://127.0.0.1:{port}", alice_token, server_key=zmq.curve_keypair()[0].decode())
        (fs,) = [s for s in root.svc_list() if s["name"] == "fs"]
        os.kill(fs["pid"], signal.SIGKILL)
        wait_for(lambda: root.audit(event="service_restart"), timeout=60)       # service_restart
        wait_for(lambda: root.audit(event="handshake_failed"))
        kinds = {e["event"] for e in root.audit()}
        assert kinds >= {"auth_failed", "cap_refused", "user_add", "user_token", "user_set", "quota_refused",
                         "signal_other", "model_load", "adapter_load", "user_key_add", "user_key_rm",
                         "key_refused", "handshake_failed", "service_restart"}, kinds
        (sig,) = root.audit(event="signal_other")
        assert (sig["user"], sig["owner"], sig["pid"], sig["sig"]) == ("root", "alice", pid, "KILL")
        assert {e["event"] for e in root.audit(user="alice")} >= {"user_add", "cap_refused", "quota_refused"}
        assert root.audit(since=sig["time"] + 3600) == []
        assert errno_of(alice.audit) == "EPERM"                                 # root's (admin's) only
        raw = b"".join(f.read_bytes() for f in (k.state / "audit").iterdir())
        assert oct((k.state / "audit" / "audit.log").stat().st_mode & 0o777) == "0o600"
        secrets = [k.token, alice_token, second, "llmos_forged",
                   zmq.auth.load_certificate(str(k.state / "keys" / "server.key_secret"))[1].decode(),
                   zmq.auth.load_certificate(str(tmp_path / "alice.key_secret"))[1].decode(),
                   remote.client_keys()[1].decode()]
        for s in secrets:
            assert s.encode() not in raw
        assert all(json.loads(line) for line in raw.splitlines())
        env = {**os.environ, "LLMOS_SOCKET": k.socket, "LLMOS_TOKEN": k.token}
        r = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "audit", "--since", "1h", "--user", "alice",
                            "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and {e["event"] for e in json.loads(r.stdout)} >= {"user_add", "quota_refused"}
        r = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "audit", "--event", "signal_other"],
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "signal_other" in r.stdout and "owner=alice" in r.stdout
        root.close()
        alice.close()
    finally:
        k.cleanup()
