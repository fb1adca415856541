"""One-shot ``llmos CMD`` commands: the shell's command table, run once, scriptable with --json."""
import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

from conftest import KernelProc, wait_for
from llmos.userland.top import render_top, with_rates


@pytest.fixture(scope="module")
def kernel():
    k = KernelProc("--service", "fs", "--service", "kg", "--service", "tuner", model="default").start()
    with k.client() as c:
        wait_for(lambda: all(s["state"] == "up" for s in c.svc_list()), timeout=120)
    yield k
    k.cleanup()


def llmos(kernel: KernelProc | None, *args: str, socket: str | None = None, timeout: float = 60,
          **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMOS_STATE_DIR": str(kernel.state if kernel else "/nonexistent")}
    env["LLMOS_SOCKET"] = socket or kernel.socket
    env["LLMOS_TOKEN"] = kernel.token if kernel else "x"
    r = subprocess.run([sys.executable, "-m", "llmos.userland.cli", *args], env=env, capture_output=True,
                       text=True, timeout=timeout, **kw)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def as_json(kernel, *args):
    r = llmos(kernel, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_tables_have_a_json_form(kernel):
    assert as_json(kernel, "whoami")["user"] == "root"
    models = as_json(kernel, "models")
    assert models[0]["name"] == "llmos-tiny-random" and models[0]["where"] == "device"
    assert set(as_json(kernel, "free")) >= {"device", "host"}
    pid = as_json(kernel, "spawn", "-n", "4", "--ignore-eos", "hello")["pid"]
    assert pid in [p["pid"] for p in as_json(kernel, "ps")]
    r = as_json(kernel, "wait", str(pid))
    assert r["usage"]["completion_tokens"] == 4
    assert {s["name"] for s in as_json(kernel, "svc", "list")} >= {"fs", "kg"}
    table = llmos(kernel, "models").stdout
    assert "NAME" in table and "llmos-tiny-random" in table


def test_top_once_prints_one_frame_and_json_its_data(kernel):
    r = llmos(kernel, "top", "--once")
    assert r.returncode == 0 and "llmos top" in r.stdout and "KV " in r.stdout and "services" in r.stdout
    data = as_json(kernel, "top")
    assert {"ps", "meminfo", "free", "models", "devinfo", "services", "alerts", "queue", "tok_s_total"} <= set(data)


def test_top_frame_is_a_pure_function_of_two_samples():
    proc = {"pid": 7, "user": "root", "state": "RUNNING", "nice": -5, "model": "m", "tokens_in": 3, "kv_blocks": 2,
            "age_s": 9.0}
    prev = {"time": 0.0, "mono": 10.0, "ps": [{**proc, "tokens_out": 100}], "stat": {"tokens_generated": 500}}
    snap = {"time": 1.0, "mono": 12.0, "ps": [{**proc, "tokens_out": 160}, {**proc, "pid": 8, "state": "READY",
                                                                           "tokens_out": 0}],
            "stat": {"tokens_generated": 600}, "meminfo": {"blocks_used": 4, "blocks_total": 16},
            "devinfo": {"kind": "cuda", "name": "H100", "utilization_pct": 87.0, "temperature_c": 61.0},
            "alerts": {"active": [{"name": "kv_usage", "severity": "warning", "message": "KV 96% used"}]}}
    data = with_rates(prev, snap)
    assert data["ps"][0]["tok_s"] == 30.0 and data["ps"][1]["tok_s"] is None
    assert data["tok_s_total"] == 50.0 and data["queue"] == 1 and data["states"] == {"RUNNING": 1, "READY": 1}
    console = Console(width=120, record=True, file=open(os.devnull, "w"))
    console.print(render_top(data))
    text = console.export_text()
    for shown in ("tokens/s 50.0", "queue 1", "KV 4/16 blocks (25%)", "util 87%", "61°C",
                  "ALERT [warning] kv_usage: KV 96% used", "30.0"):
        assert shown in text, shown


def test_run_gives_a_program_the_kernel_and_returns_its_exit_code(kernel, tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("import sys\nfrom llmos import connect\n"
                    "print(connect().whoami()['user'], sys.argv[1:])\nsys.exit(3)\n")
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    env_free["LLMOS_STATE_DIR"] = str(kernel.state)        # only the saved token and default socket
    r = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "run", str(prog), "a", "--json"],
                       env=env_free, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stdout.strip() == "root ['a', '--json']"


def test_files_up_and_down_small_and_chunked(kernel, tmp_path):
    small, big = tmp_path / "small.txt", tmp_path / "big.bin"
    small.write_text("hello store\n")
    big.write_bytes(os.urandom(5 << 20))                  # over the single-call size: goes in chunks
    assert as_json(kernel, "put", str(small), "docs/small.txt")["size"] == 12
    assert as_json(kernel, "put", str(big), "docs/big.bin")["size"] == 5 << 20
    assert {f["path"] for f in as_json(kernel, "ls", "docs")} == {"docs/small.txt", "docs/big.bin"}
    assert llmos(kernel, "cat", "docs/small.txt").stdout == "hello store\n"
    r = llmos(kernel, "get", "docs/big.bin", str(tmp_path / "back.bin"))
    assert r.returncode == 0 and (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    assert llmos(kernel, "rm", "docs/small.txt", "docs/big.bin").returncode == 0
    assert as_json(kernel, "ls") == []
    r = llmos(kernel, "cat", "docs/small.txt")
    assert r.returncode == 1 and r.stderr.startswith("ENOENT: ")


def test_knowledge_graph_commands(kernel):
    assert as_json(kernel, "kg", "add", "Ada", "works_at", "Acme")["added"] == 1
    assert as_json(kernel, "kg", "add", "Acme", "located_in", "Paris")["added"] == 1
    assert as_json(kernel, "kg", "query", "?who", "works_at", "Acme") == [{"?who": "Ada"}]
    assert len(as_json(kernel, "kg", "path", "Ada", "Paris")) == 2
    assert as_json(kernel, "kg", "search", "acm")[0]["name"] == "Acme"
    assert "Ada" in llmos(kernel, "kg", "query", "?who", "works_at", "Acme").stdout


def test_bad_input_is_one_line_of_help_not_a_traceback(kernel):
    r = llmos(kernel, "frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
    r = llmos(kernel, "nice", "1")
    assert r.returncode == 2 and r.stderr.startswith("usage: nice")
    r = llmos(kernel, "kill", "99999")
    assert r.returncode == 1 and r.stderr.startswith("ESRCH: ")
    r = llmos(kernel, "call", "no_such_call")
    assert r.returncode == 1 and r.stderr.startswith("ENOSYS: ")
    r = llmos(kernel, "tune", "list")                   # the tuner may or may not be running here
    assert r.returncode == 0 or r.stderr.startswith(("ENOSYS: ", "EAGAIN: "))
    r = llmos(kernel, "whoami", socket="ipc:///tmp/llmos-no-such-dir/kernel.sock")
    assert r.returncode == 1 and "kernel not reachable at ipc:///tmp/llmos-no-such-dir/kernel.sock" in r.stderr


def test_legacy_subcommands_still_answer(kernel):
    assert json.loads(llmos(kernel, "stat", "--json").stdout)["uptime_s"] > 0
    assert "root" in llmos(kernel, "user", "list").stdout
    token = llmos(kernel, "user", "add", "gina").stdout.strip()
    assert token.startswith("llmos_") and "\n" not in token
    r = llmos(kernel, "call", "whoami", "--json")
    assert json.loads(r.stdout)["user"] == "root"
    assert "spawn" in llmos(kernel, "help").stdout


def test_tune_submit_status_and_list(kernel):
    with kernel.client() as c:
        c.call("fs_put", path="data/cli.jsonl", data=b'{"prompt": "Hi?", "completion": " hello"}\n'
                                                      b'{"prompt": "Bye?", "completion": " goodbye"}\n')
    r = as_json(kernel, "tune", "submit", "data/cli.jsonl", "--name", "cli", "--param", "epochs=3",
                "--param", "rank=4", "--val-fraction", "0")
    job = r["job"]
    assert r["num_train"] == 2 and r["num_val"] == 0
    wait_for(lambda: as_json(kernel, "tune", "status", job)["state"] == "done", timeout=120)
    assert as_json(kernel, "tune", "status", job)["adapter"] == "adapters/cli"
    assert job in llmos(kernel, "tune", "list").stdout
    bad = llmos(kernel, "tune", "submit", "data/cli.jsonl", "--param", "rank=0")
    assert bad.returncode == 1 and bad.stderr.startswith("EINVAL: ") and "rank" in bad.stderr


def test_alerts_command_lists_and_sets_thresholds(kernel):
    r = as_json(kernel, "alerts", "queue_wait_s", "12")
    assert r["thresholds"]["queue_wait_s"] == 12.0 and "active" in r
    assert "queue_wait_s" in llmos(kernel, "alerts").stdout
    bad = llmos(kernel, "alerts", "nope", "1")
    assert bad.returncode == 1 and bad.stderr.startswith("EINVAL: ")
    assert llmos(kernel, "alerts", "kv_usage").returncode == 2


def test_user_set_changes_a_share_that_user_list_and_ps_show(kernel):
    llmos(kernel, "user", "add", "dora")
    r = llmos(kernel, "user", "set", "dora", "share=2.5")
    assert r.returncode == 0 and "dora: share 2.5" in r.stdout
    assert {u["user"]: u["share"] for u in as_json(kernel, "user", "list")}["dora"] == 2.5
    assert "2.5" in llmos(kernel, "user", "list").stdout
    bad = llmos(kernel, "user", "set", "dora", "share=lots")
    assert bad.returncode != 0 and "share must be a number" in bad.stderr
    pid = as_json(kernel, "spawn", "-n", "200", "--ignore-eos", "hello")["pid"]
    table = llmos(kernel, "ps").stdout
    assert "SHARE" in table and "TOKENS_SERVED" in table and "KV_SHARED" in table
    assert "users" in llmos(kernel, "top", "--once").stdout
    llmos(kernel, "kill", str(pid))
    as_json(kernel, "wait", str(pid))


def test_checkpoint_and_restore_through_the_file_store(kernel):
    pid = as_json(kernel, "spawn", "-n", "6", "--ignore-eos", "--stopped", "hello")["pid"]
    r = llmos(kernel, "checkpoint", str(pid), "images/cli.img")
    assert r.returncode == 0 and f"pid {pid} -> images/cli.img" in r.stdout, r.stderr
    new = as_json(kernel, "restore", "images/cli.img")
    assert as_json(kernel, "pinfo", str(new))["state"] == "STOPPED"
    llmos(kernel, "cont", str(pid), str(new))
    assert as_json(kernel, "wait", str(new))["token_ids"] == as_json(kernel, "wait", str(pid))["token_ids"]
    r = llmos(kernel, "restore", "images/none.img")
    assert r.returncode != 0 and "ENOENT" in r.stderr + r.stdout
