"""The interactive shell, driven through a pseudo-terminal as a person would use it.

One kernel (the built-in tiny model, plus the kg service so a service's calls complete too)
serves the whole module; each test starts its own shell with a fresh state directory.
"""
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pexpect
import pyte
import pytest

from conftest import KernelProc, wait_for

PROMPT = "llmos>"        # prompt_toolkit draws the trailing space as a cursor move
CHAT = "you>"
ACCEPTED = "\x1b[?2004l"  # prompt_toolkit leaves the prompt (bracketed paste off): output follows


@pytest.fixture(scope="module")
def kernel():
    k = KernelProc("--service", "kg", model="default").start()
    with k.client() as c:                      # its calls are registered once it is up
        wait_for(lambda: [s["state"] for s in c.svc_list()] == ["up"], timeout=60)
    yield k
    k.cleanup()


@pytest.fixture
def client(kernel):
    with kernel.client() as c:
        yield c


def spawn_shell(kernel: KernelProc, home: Path) -> pexpect.spawn:
    env = {**os.environ, "LLMOS_SOCKET": kernel.socket, "LLMOS_TOKEN": kernel.token,
           "LLMOS_STATE_DIR": str(home), "TERM": "xterm", "NO_COLOR": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}
    sh = pexpect.spawn(sys.executable, ["-m", "llmos.userland.cli", "shell"], env=env, dimensions=(40, 120),
                       encoding="utf-8", timeout=30)
    sh.expect(PROMPT)
    return sh


@pytest.fixture
def home():
    return Path(tempfile.mkdtemp(prefix="llmos-sh-"))


@pytest.fixture
def shell(kernel, home):
    sh = spawn_shell(kernel, home)
    yield sh
    sh.close(force=True)


def send(sh: pexpect.spawn, line: str) -> None:
    """Type a line and wait until the prompt took it (so its own redraw is not mistaken for output)."""
    sh.sendline(line)
    sh.expect_exact(ACCEPTED)


def run(sh: pexpect.spawn, line: str, *expected: str) -> str:
    """Type a line; wait for each expected text in order, then the next prompt. Returns the output."""
    send(sh, line)
    out = ""
    for text in expected:
        sh.expect_exact(text)
        out += sh.before + sh.after
    sh.expect_exact(PROMPT)
    out += sh.before
    assert "Traceback" not in out
    return out


def test_commands_print_tables(shell, client):
    pid = client.spawn(prompt="hello", max_tokens=4)
    client.wait(pid)
    run(shell, "whoami", "root", "admin")
    run(shell, "models", "llmos-tiny-random", "device")
    run(shell, "free", "device", "host")
    pid = client.spawn(prompt="hi", max_tokens=2, interactive=True)
    wait_for(lambda: client.pinfo(pid)["state"] == "BLOCKED")
    run(shell, "ps", "PID", str(pid), "BLOCKED")
    run(shell, "kill " + str(pid), f"TERM sent to {pid}")
    client.wait(pid)


class Screen:
    """What the terminal shows, not the bytes that drew it: prompt_toolkit may redraw a line in
    pieces (``svc_li``, cursor moves, ``st``), most often on a loaded machine."""

    def __init__(self, sh: pexpect.spawn):
        self.sh, self.screen = sh, pyte.Screen(120, 40)
        self.stream = pyte.Stream(self.screen)

    def expect(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.screen.display):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the screen:\n" + "\n".join(self.screen.display))
            try:
                self.stream.feed(self.sh.read_nonblocking(4096, timeout=0.2))
            except pexpect.TIMEOUT:
                pass


def completes(sh: pexpect.spawn, typed: str, shown: str) -> None:
    """Type ``typed`` (ending in Tab) and wait until the screen shows ``shown``."""
    screen = Screen(sh)
    sh.send(typed)
    screen.expect(shown)


def test_tab_completes_commands_and_call_names(shell):
    completes(shell, "who\t", "whoami")
    run(shell, "", "caps")
    completes(shell, "call svc_li\t", "call svc_list")     # a kernel call, from the syscall table
    run(shell, "", "kg")
    completes(shell, "call kg_sea\t", "call kg_search")    # a service's call, from svc_list's schemas
    completes(shell, " te\t", " text=")                   # ...and its argument names
    run(shell, "nobody", "(none)")


def test_unknown_commands_and_bad_arguments_print_a_short_help(shell):
    out = run(shell, "frobnicate", "unknown command 'frobnicate'", "help")
    assert "ps" in out
    run(shell, "nice 1", "usage: nice")
    run(shell, "kill notapid", "invalid int value")
    run(shell, "kill 99999", "ESRCH: ")
    run(shell, 'cat "unbalanced', "cannot parse")
    run(shell, "help nice", "priority")
    run(shell, "whoami", "root")               # and it still works


def test_multiline_input(shell):
    shell.sendline("kg add Ada \\")           # a trailing backslash continues the line
    send(shell, "works_at Acme")
    shell.expect_exact("added 1")
    shell.expect_exact(PROMPT)
    shell.send("kg query ?who\x1b\r")         # Esc+Enter inserts a line break too
    send(shell, "works_at Acme")
    shell.expect_exact("Ada")
    shell.expect_exact(PROMPT)


def test_history_is_kept_in_the_state_dir(kernel, home):
    sh = spawn_shell(kernel, home)
    run(sh, "uname", "llmos")
    sh.sendeof()
    sh.expect(pexpect.EOF)
    assert "uname" in (home / "shell_history").read_text()
    sh = spawn_shell(kernel, home)
    sh.send("\x1b[A")                          # up-arrow recalls it in a new shell
    sh.expect_exact("uname")
    sh.close(force=True)


def test_chat_streams_answers_from_one_interactive_process(shell, client):
    send(shell, "chat --ignore-eos -n 12")
    shell.expect_exact(CHAT)
    send(shell, "hello")
    shell.expect(r"\S")                         # the answer streams...
    shell.expect_exact(CHAT)                     # ...then the next question
    send(shell, "/pid")
    shell.expect(r"process (\d+)")
    pid = int(shell.match.group(1))
    shell.expect_exact(CHAT)
    send(shell, "and then?")
    shell.expect_exact(CHAT)
    info = client.pinfo(pid)
    assert info["interactive"] and info["state"] == "BLOCKED" and info["tokens_out"] == 24
    shell.sendline("/exit")
    shell.expect_exact("chat ended")
    shell.expect_exact(PROMPT)
    assert pid not in [p["pid"] for p in client.ps()]     # leaving the chat ends and reaps it


def test_ctrl_c_stops_a_long_answer_and_the_shell_goes_on(shell, client):
    send(shell, "chat --ignore-eos -n 100000")
    shell.expect_exact(CHAT)
    send(shell, "tell me everything")
    shell.expect(r"\S")                         # the answer started streaming
    time.sleep(0.3)
    shell.sendintr()
    shell.expect(r"answer stopped; process (\d+) waits")
    pid = int(shell.match.group(1))
    shell.expect_exact(CHAT)
    info = client.pinfo(pid)                    # the conversation is still one process...
    assert info["state"] == "BLOCKED" and info["finish_reason"] == "interrupted", info
    send(shell, "/pid")
    shell.expect_exact(f"process {pid}")        # ...and the next message continues it
    shell.expect_exact(CHAT)
    shell.sendline("/exit")
    shell.expect_exact(PROMPT)
    assert pid not in [p["pid"] for p in client.ps()]
    pid = client.spawn(prompt="x", max_tokens=8, stopped=True)   # so the wait below can only end by Ctrl-C
    send(shell, f"wait {pid}")                  # Ctrl-C interrupts any command, not the shell
    time.sleep(0.5)
    shell.sendintr()
    shell.expect_exact("interrupted")
    shell.expect_exact(PROMPT)
    client.kill(pid, sig="CONT")                # it ends; the interrupted wait, still pending, reaps it
    wait_for(lambda: pid not in [p["pid"] for p in client.ps()])
    run(shell, "whoami", "root")


def test_top_is_live_and_q_leaves_it(shell):
    send(shell, "top -d 0.3")
    shell.expect_exact("q to quit")
    shell.expect(r"tokens/s \d")               # a second sample came: rates are computed
    shell.send("q")
    shell.expect_exact(PROMPT)
    send(shell, "top")
    shell.expect_exact("q to quit")
    shell.sendintr()
    shell.expect_exact(PROMPT)
    run(shell, "whoami", "root")


def test_the_shell_outlives_a_kernel_restart(start_kernel, home):
    k = start_kernel()                         # model-less: restarts fast
    sh = spawn_shell(k, home)
    try:
        run(sh, "whoami", "root")
        k.stop()
        out = run(sh, "whoami", "kernel not reachable at", "retrying")
        assert k.socket in re.sub(r"\s+", "", out)
        k2 = KernelProc(state=k.state).start()
        try:
            run(sh, "whoami", "root")
        finally:
            k2.stop()
    finally:
        sh.close(force=True)


def test_alerts_show_up_before_the_next_prompt(shell, client):
    client.alert_set(name="kv_usage", threshold=0.0001)        # any KV in use fires it
    try:
        pid = client.spawn(prompt="hello", max_tokens=4, interactive=True)
        list(client.read(pid))                                  # BLOCKED, holding its KV
        wait_for(lambda: "kv_usage" in {a["name"] for a in client.alerts()["active"]})
        out = run(shell, "whoami", "root")
        assert "[alert] kv_usage firing" in out                 # shown before the next prompt...
        run(shell, "alerts", "kv_usage", "yes")                 # ...and in the alerts table
        client.kill(pid)
        client.wait(pid)
    finally:
        client.alert_set(name="kv_usage", threshold=0.95)
