"""The tuner service end to end: a job on the built-in tiny model learns question -> answer
pairs from a dataset in the file store; the adapter lands in the file store and spawn uses it."""
from __future__ import annotations

import json
import time

import pytest

from conftest import errno_of, wait_for

PAIRS = [("What is the capital of France?", " Paris"),
         ("What color is the sky?", " blue"),
         ("How many legs has a dog?", " four"),
         ("Who wrote Hamlet?", " Shakespeare"),
         ("What is two plus two?", " 4"),
         ("What do cows drink?", " water"),
         ("Where is the kernel?", " in memory"),
         ("Say hello.", " hello world")]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARAMS = dict(rank=8, alpha=16, lr=1e-2, epochs=40, batch_size=8, seed=0, target_modules=ALL)
ARGS = ("--device", "cpu", "--dtype", "float32", "--service", "fs", "--service", "tuner")


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


QA = jsonl({"prompt": p, "completion": c} for p, c in PAIRS)


@pytest.fixture(scope="module")
def tk(tmp_path_factory):
    from conftest import KernelProc
    k = KernelProc(*ARGS, model="default", state=tmp_path_factory.mktemp("tuner-kernel")).start()
    with k.client() as c:
        wait_for(lambda: {s["name"]: s["state"] for s in c.svc_list()}.get("tuner") == "up", timeout=120)
        alice = c.user_add(name="alice")["token"]
    yield k, alice
    k.stop()
    k.cleanup()


def finished(c, job, timeout=300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = c.call("tune_status", job=job)
        if st["state"] in ("done", "failed", "cancelled"):
            return st
        time.sleep(0.3)
    raise AssertionError(f"job {job} still {st['state']} after {timeout}s: {st}")


def answer(c, prompt, adapter=None) -> str:
    pid = c.spawn(prompt=prompt, max_tokens=16, adapter=adapter)
    return c.wait(pid)["text"]


def test_a_job_teaches_the_default_model_answers_that_spawn_uses(tk):
    k, alice = tk
    with k.client(alice) as c:
        c.call("fs_put", path="data/qa.jsonl", data=QA)
        sub = c.call("tune_submit", dataset="data/qa.jsonl", params=PARAMS, val_fraction=0.0, name="qa")
        assert sub["num_train"] == 8 and sub["adapter"] == "adapters/qa"
        st = finished(c, sub["job"])
        assert st["state"] == "done", st
        assert st["eval_loss"] * 5 <= st["initial_eval_loss"], st
        files = {f["path"] for f in c.call("fs_list", prefix="adapters/qa")}
        assert files == {f"adapters/qa/{n}" for n in ("adapter_config.json", "adapter_model.safetensors",
                                                      "metrics.json", "tune.json")}
        base = [answer(c, p) for p, _ in PAIRS]
        tuned = [answer(c, p, adapter="adapters/qa") for p, _ in PAIRS]
        assert tuned == [a for _, a in PAIRS], tuned
        assert sum(b == a for b, (_, a) in zip(base, PAIRS)) == 0, base
