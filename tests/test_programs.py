"""The example programs (userland/programs/) run against a real kernel and do what they say.

One kernel with the fs, kg and tuner services on the built-in tiny model; each test runs a
program's ``main`` in-process as a fresh user (its own graph, file store and feedback), with
LLMOS_SOCKET/LLMOS_TOKEN set as ``llmos run`` sets them, and checks what it printed.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KernelProc, wait_for
from llmos.userland.programs import feedback_tune, parallel_sampling, sentiment_monitor, support_bot

PROGRAMS = Path(support_bot.__file__).parent
# --max-num-seqs 8: a batch of 24 contends for the running set, so priorities matter.
ARGS = ("--device", "cpu", "--dtype", "float32", "--max-num-seqs", "8",
        "--service", "fs", "--service", "kg", "--service", "tuner")


@pytest.fixture(scope="module")
def pk(tmp_path_factory):
    k = KernelProc(*ARGS, model="default", state=tmp_path_factory.mktemp("programs-kernel")).start()
    with k.client() as c:
        wait_for(lambda: {s["name"] for s in c.svc_list() if s["state"] == "up"} >= {"fs", "kg", "tuner"},
                 timeout=120)
    yield k
    k.cleanup()


@pytest.fixture
def user(pk, monkeypatch, request):
    """A fresh user for one test, with the environment ``llmos run`` gives a program."""
    with pk.client() as root:
        token = root.user_add(name=request.node.name[:40])["token"]
    monkeypatch.setenv("LLMOS_SOCKET", pk.socket)
    monkeypatch.setenv("LLMOS_TOKEN", token)
    with pk.client(token) as c:
        yield c


def run(program, argv, capsys) -> tuple[int, str]:
    rc = program.main(argv)
    return rc, capsys.readouterr().out


def test_support_bot_answers_with_the_facts_about_what_is_asked_and_follows_up(user, capsys):
    rc, out = run(support_bot, [], capsys)
    assert rc == 0 and "0 facts put in front (try --seed)" in out           # an empty graph: no facts
    rc, out = run(support_bot, ["--seed", "How much does the Nimbus X2 cost?", "Tell me about the return policy"],
                  capsys)
    assert rc == 0 and "seeded the knowledge graph: 8 new of 8 facts" in out
    nimbus, policy = out.split("\nQ: ")[1:]
    assert "- Nimbus X2 costs $999." in nimbus and "- return policy" not in nimbus
    assert "- return policy allows returns within 30 days." in policy and "Nimbus" not in policy
    for turn in (nimbus, policy):                 # an answer, the follow-up and its answer, one process
        assert turn.count("  A: ") == 2 and "Q: And does that apply" in turn
    assert user.ps() == []                        # every conversation was ended and reaped


def test_sentiment_monitor_keeps_the_interactive_chat_ahead_of_the_batch(user, capsys):
    rc, out = run(sentiment_monitor, ["--reviews", "24", "--max-tokens", "24"], capsys)
    assert rc == 0
    rows = re.findall(r"^\s*\d+\s+(1\d)\s+[\d.]+s  (.+) -> '", out, re.MULTILINE)
    assert len(rows) == 24 and {int(n) for n, _ in rows} == set(range(10, 20))
    before = int(re.search(r"finished before the chat's first token: (\d+) of 24", out)[1])
    assert before < 12, out                       # the chat's first token came before most of the batch
    chat = float(re.search(r"chat \(nice -10\) ([\d.]+)s", out)[1])
    batch = float(re.search(r"batch \(nice 10..19\) ([\d.]+)s", out)[1])
    assert chat < batch, out                      # and sooner than a batch process's, on average
    assert user.ps() == []


def test_parallel_sampling_forks_n_distinct_samples_of_one_prompt(user, capsys):
    argv = ["-n", "4", "--seed", "3", "--max-tokens", "12"]
    rc, out = run(parallel_sampling, argv, capsys)
    assert rc == 0 and "4 distinct samples of 4" in out
    samples = re.findall(r"\(seed (\d+)\): (.*)$", out, re.MULTILINE)
    usage = re.findall(r"(\d+) prompt tokens \((\d+) from the prefix cache\), (\d+) generated", out)
    assert [int(s) for s, _ in samples] == [3, 4, 5, 6] and len(usage) == 4
    assert len({p for p, _, _ in usage}) == 1 and all(g == "12" for _, _, g in usage)
    rc, again = run(parallel_sampling, argv, capsys)
    assert rc == 0 and re.findall(r"\(seed (\d+)\): (.*)$", again, re.MULTILINE) == samples   # seeded: reproducible
    # The same prompt again: every sample finds the prompt's full blocks in the prefix cache.
    assert all(int(cached) > 0 for _, cached in
               re.findall(r"(\d+) prompt tokens \((\d+) from the prefix cache\)", again))
    assert user.ps() == []


def test_feedback_tune_teaches_the_model_the_corrections(user, capsys):
    rc, out = run(feedback_tune, ["--name", "fb-test"], capsys)
    assert rc == 0 and "4 of 4 tuned answers equal their corrections" in out, out
    assert "done: step 40/40" in out
    records = [json.loads(x) for x in user.call("fs_get", path="feedback.jsonl").splitlines()]
    assert [r["correction"] for r in records] == [a for _, a in feedback_tune.CORRECTIONS]
    files = {f["path"] for f in user.call("fs_list", prefix="adapters/fb-test")}
    assert "adapters/fb-test/adapter_model.safetensors" in files
    assert user.ps() == []


def test_a_program_runs_with_llmos_run(user):
    """``llmos run`` hands the program the kernel's socket and the caller's token."""
    llmos = Path(sys.executable).parent / "llmos"
    done = subprocess.run([str(llmos), "run", str(PROGRAMS / "parallel_sampling.py"), "-n", "3"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "3 distinct samples of 3" in done.stdout
