"""Sessions (issue 14): a client that dies without a goodbye hangs up its session — its
interactive and hup=True processes end and are reaped, the others run on — a goodbye hangs up
nothing, a zombie nobody waits for is reaped after its TTL, and a gateway SIGKILLed mid-stream
leaves nothing running."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from conftest import KernelProc, wait_for
from fixtures_models import prompt_of, tiny_models  # noqa: F401

ARGS = ("--device", "cpu", "--dtype", "float32", "--kv-blocks", "128", "--block-size", "4",
        "--session-timeout", "1.5", "--zombie-ttl", "6")
CHILD = """
import sys
from llmos import connect
c = connect(sys.argv[1], sys.argv[2])
ids = list(range(3, 12))
pids = [c.spawn(prompt_ids=ids, max_tokens=4, interactive=True),
        c.spawn(prompt_ids=ids, max_tokens=5000, ignore_eos=True, hup=True),
        c.spawn(prompt_ids=ids, max_tokens=30, ignore_eos=True, stopped=True)]
print(*pids, flush=True)
if sys.argv[3] == "bye":
    c.close()
    print("closed", flush=True)
sys.stdin.read()
"""


def _child(k, how):
    p = subprocess.Popen([sys.executable, "-c", CHILD, k.socket, k.token, how], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    if how == "bye":
        assert p.stdout.readline().strip() == "closed"
    return p, pids


def test_a_client_that_dies_hangs_up_its_session(tiny_models):
    k = KernelProc(*ARGS, model=tiny_models["llama"]).start()
    try:
        p, (chat, hup, plain) = _child(k, "crash")
        with k.client() as c:
            wait_for(lambda: c.pinfo(chat)["state"] == "BLOCKED", timeout=60)
            time.sleep(2 * 1.5)                     # heartbeats keep the live client's session up
            assert {r["pid"] for r in c.ps()} == {chat, hup, plain}
            p.kill()
            p.wait()
            wait_for(lambda: {r["pid"] for r in c.ps()} == {plain}, timeout=60)   # hung up and reaped
            assert c.pinfo(plain)["state"] == "STOPPED"                           # nohup: it lives on
            c.kill(plain, "CONT")
            wait_for(lambda: c.pinfo(plain)["state"] == "ZOMBIE", timeout=120)
            assert 0 < c.pinfo(plain)["reap_in_s"] <= 6
            wait_for(lambda: c.ps() == [], timeout=30)                           # reaped after its TTL
    finally:
        k.cleanup()


def test_a_goodbye_hangs_up_nothing(tiny_models):
    k = KernelProc(*ARGS, model=tiny_models["llama"]).start()
    try:
        p, (chat, hup, plain) = _child(k, "bye")
        p.kill()
        p.wait()
        with k.client() as c:
            deadline = time.monotonic() + 3 * 1.5
            while time.monotonic() < deadline:        # past the session timeout: nothing is hung up
                assert {r["pid"] for r in c.ps()} >= {chat, hup}
                time.sleep(0.2)
    finally:
        k.cleanup()


def test_a_gateway_sigkilled_mid_stream_leaves_no_process_running(tiny_models):
    k = KernelProc(*ARGS, model=tiny_models["llama"]).start()
    gw, base = _gateway(k)
    try:
        body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
                "n": 3, "stream": True, "temperature": 0.0}
        with k.client() as c, httpx.Client(timeout=60, headers={"Authorization": f"Bearer {k.token}"}) as h:
            model = c.models()[0]["name"]
            with h.stream("POST", base + "/v1/chat/completions", json={**body, "model": model}) as r:
                lines = r.iter_lines()
                while not next(lines).startswith("data: {"):
                    pass
                assert len(c.ps()) == 3
                gw.kill()                               # SIGKILL mid-stream
                gw.wait()
            wait_for(lambda: c.ps() == [], timeout=60)  # HUP: ended and reaped
    finally:
        if gw.poll() is None:
            gw.kill()
        k.cleanup()


def _gateway(k) -> tuple[subprocess.Popen, str]:
    """``llmos serve-http`` as its own process on a free port, once it answers; (it, base URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LLMOS_SOCKET": k.socket, "LLMOS_TOKEN": k.token}
    gw = subprocess.Popen([sys.executable, "-m", "llmos.userland.cli", "serve-http", "--port", str(port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _up(base) or gw.poll() is not None, timeout=60)
    return gw, base


def _up(base):
    try:
        return httpx.get(base + "/v1/models", timeout=2).status_code in (200, 401)
    except httpx.HTTPError:
        return False


def test_a_gateway_stream_goes_on_across_a_kernel_restart(tiny_models):
    """The gateway's SSE stream resumes by itself when the kernel is SIGKILLed and comes back:
    the streamed text equals the kernel's own answer, each piece once."""
    k = KernelProc(*ARGS, model=tiny_models["llama"]).start()
    gw, base = _gateway(k)
    try:
        with k.client() as c:
            model = c.models()[0]["name"]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60,
                "stream": True, "temperature": 0.0, "seed": 1}
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {k.token}"}) as h:
            whole = h.post(base + "/v1/chat/completions", json={**body, "stream": False}).json()
            text, killed = "", False
            with h.stream("POST", base + "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    text += delta
                    if delta and not killed:
                        killed = True
                        k.stop(signal.SIGKILL)
                        k.start()
        assert killed and text == whole["choices"][0]["message"]["content"]
    finally:
        gw.kill()
        k.cleanup()
