"""The tuner service end to end: a job on the built-in tiny model learns question -> answer
pairs from a dataset in the file store; the adapter lands in the file store and spawn uses it."""
from __future__ import annotations

import json
import time

import pytest

from conftest import errno_of, wait_for
from test_tuner_core import ALL_PROJECTIONS, PAIRS

PARAMS = dict(rank=8, alpha=16, lr=1e-2, epochs=40, batch_size=8, seed=0, target_modules=ALL_PROJECTIONS)
ARGS = ("--device", "cpu", "--dtype", "float32", "--service", "fs", "--service", "tuner")


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


QA = jsonl({"prompt": p, "completion": c} for p, c in PAIRS)


@pytest.fixture(scope="module")
def tk(tmp_path_factory):
    from conftest import KernelProc
    k = KernelProc(*ARGS, model="default", state=tmp_path_factory.mktemp("tuner-kernel")).start()
    with k.client() as c:
        wait_for(lambda: all(s["state"] == "up" for s in c.svc_list()), timeout=120)
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
        assert c.call("tune_status", job=sub["job"])["adapter"] is None      # not until it is done
        st = finished(c, sub["job"])
        assert st["state"] == "done" and st["adapter"] == "adapters/qa", st
        assert st["eval_loss"] * 5 <= st["initial_eval_loss"], st
        files = {f["path"] for f in c.call("fs_list", prefix="adapters/qa")}
        assert files == {f"adapters/qa/{n}" for n in ("adapter_config.json", "adapter_model.safetensors",
                                                      "metrics.json", "tune.json")}
        base = [answer(c, p) for p, _ in PAIRS]
        tuned = [answer(c, p, adapter="adapters/qa") for p, _ in PAIRS]
        assert tuned == [a for _, a in PAIRS], tuned
        assert sum(b == a for b, (_, a) in zip(base, PAIRS)) == 0, base


def test_search_keeps_every_trial_and_picks_the_lowest_validation_loss(tk):
    k, alice = tk
    with k.client(alice) as c:
        c.call("fs_put", path="data/qa.jsonl", data=QA)
        space = {"lr": [1e-4, 3e-3, 1e-2], "rank": [4, 8]}
        for strategy, trials in (("random", 3), ("halving", 4)):
            sub = c.call("tune_submit", dataset="data/qa.jsonl", val_fraction=0.0, name=f"s-{strategy}",
                         params=dict(PARAMS, epochs=6),
                         search={"space": space, "trials": trials, "strategy": strategy, "eta": 2})
            st = finished(c, sub["job"])
            assert st["state"] == "done", st
            assert len(st["trials"]) == trials
            done = [t for t in st["trials"] if t["state"] == "done"]
            best = min(done, key=lambda t: t["eval_loss"])
            assert st["best_trial"] == best["id"]
            if strategy == "halving":     # 4 -> 2 -> 1, each rung training longer
                assert sorted(t["state"] for t in st["trials"]).count("pruned") == 3
                assert best["steps"] == 6 and min(t["steps"] for t in st["trials"]) < 6
            record = json.loads(c.call("fs_get", path=f"adapters/s-{strategy}/tune.json"))
            assert [t["params"] for t in record["trials"]] == [t["params"] for t in st["trials"]]
            assert record["best_trial"] == best["id"]


@pytest.mark.parametrize("kwargs, errno, words", [
    (dict(dataset="data/bad.jsonl"), "EINVAL", "line 2"),
    (dict(dataset="data/none.jsonl"), "ENOENT", "none.jsonl"),
    (dict(dataset="data/qa.jsonl", base_model="no-such-model"), "ENOENT", "no-such-model"),
    (dict(dataset="data/qa.jsonl", params={"rank": 0}), "EINVAL", "rank"),
    (dict(dataset="data/qa.jsonl", params={"nope": 1}), "EINVAL", "nope"),
    (dict(dataset="data/qa.jsonl", search={"space": {}}), "EINVAL", "space is empty"),
    (dict(dataset="data/qa.jsonl", search={"space": {"lr": []}}), "EINVAL", "no candidates"),
    (dict(dataset="data/qa.jsonl", search={"space": {"lr": [0.1]}, "strategy": "grid"}), "EINVAL", "strategy"),
    (dict(dataset="data/qa.jsonl", name="../x"), "EINVAL", "name"),
])
def test_bad_submissions_are_refused_clearly(tk, kwargs, errno, words):
    k, alice = tk
    with k.client(alice) as c:
        c.call("fs_put", path="data/qa.jsonl", data=QA)
        c.call("fs_put", path="data/bad.jsonl", data=QA.splitlines(True)[0] + b'{"prompt": "x"\n')
        with pytest.raises(Exception) as e:
            c.call("tune_submit", **kwargs)
        assert e.value.errno == errno and words in e.value.message, e.value


def test_cancel_mid_run_publishes_nothing_and_jobs_are_private(tk):
    k, alice = tk
    with k.client(alice) as c:
        c.call("fs_put", path="data/qa.jsonl", data=QA)
        job = c.call("tune_submit", dataset="data/qa.jsonl", name="never",
                     params=dict(PARAMS, epochs=100000))["job"]
        wait_for(lambda: c.call("tune_status", job=job)["step"] > 2, timeout=120)
        running = c.call("tune_status", job=job)
        assert running["state"] == "running" and running["eta_s"] > 0 and running["tokens_per_s"] > 0
        with k.client() as root:
            assert job in {j["job"] for j in root.call("tune_list")}
        bob = k.client().user_add(name="bob")["token"]
        with k.client(bob) as b:
            assert errno_of(b.call, "tune_status", job=job) == "ENOENT"
            assert errno_of(b.call, "tune_cancel", job=job) == "ENOENT"
            assert b.call("tune_list") == []
        c.call("tune_cancel", job=job)
        st = finished(c, job, timeout=60)
        assert st["state"] == "cancelled"
        assert c.call("fs_list", prefix="adapters/never") == []
        assert errno_of(c.call, "tune_cancel", job=job) == "EINVAL"


def test_feedback_becomes_a_dataset_the_tuner_trains_on(tk):
    k, alice = tk
    with k.client(alice) as c:
        assert errno_of(c.call, "tune_submit", dataset="feedback") == "ENOENT"
        busy = c.spawn(prompt="x", max_tokens=4, stopped=True)
        assert errno_of(c.feedback, pid=busy, rating=1) == "EINVAL"          # nothing to rate yet
        c.kill(busy, "KILL")
        c.wait(busy)
        for prompt, correct in PAIRS[:4]:
            pid = c.spawn(prompt=prompt, max_tokens=4, interactive=True)
            list(c.read(pid))
            out = c.feedback(pid=pid, rating=-1, correction=correct)
            assert out["path"] == "feedback.jsonl"
            c.kill(pid)
        assert out["records"] == 4
        lines = [json.loads(x) for x in c.call("fs_get", path="feedback.jsonl").splitlines()]
        assert [x["prompt"] for x in lines] == [p for p, _ in PAIRS[:4]]
        assert all(x["rating"] == -1 and x["completion"] for x in lines)
        sub = c.call("tune_submit", dataset="feedback", params=PARAMS, val_fraction=0.0, name="fb")
        assert sub["num_train"] == 4
        assert finished(c, sub["job"])["state"] == "done"
        assert [answer(c, p, adapter="adapters/fb") for p, _ in PAIRS[:4]] == [a for _, a in PAIRS[:4]]
        with k.client() as root, k.client(root.user_add(name="carol")["token"]) as carol:
            assert errno_of(carol.feedback, pid=pid, rating=1) in ("ESRCH", "EPERM")   # not hers


def test_a_job_survives_sigkill_of_the_tuner_and_resumes_from_its_checkpoint(tk):
    import os
    import signal
    k, alice = tk
    with k.client(alice) as c, k.client() as root:
        c.call("fs_put", path="data/qa.jsonl", data=QA)
        job = c.call("tune_submit", dataset="data/qa.jsonl", name="resumed", val_fraction=0.0,
                     params=dict(PARAMS, epochs=60))["job"]
        wait_for(lambda: c.call("tune_status", job=job)["step"] >= 25, timeout=120)
        pid = {s["name"]: s for s in root.svc_list()}["tuner"]["pid"]
        os.kill(pid, signal.SIGKILL)
        tuner = lambda: {s["name"]: s for s in root.svc_list()}["tuner"]  # noqa: E731
        wait_for(lambda: (lambda t: t["state"] == "up" and t["pid"] != pid)(tuner()), timeout=120)
        st = finished(c, job)
        assert st["state"] == "done", st
        kinds = [e["event"] for e in c.call("tune_status", job=job, since=0)["events"]]
        assert "requeued" in kinds
        assert st["trials"][0]["steps"] == 60 and st["trials"][0]["resumed_from_step"] >= 10   # not from scratch
        metrics = json.loads(c.call("fs_get", path="adapters/resumed/metrics.json"))
        assert metrics["steps"] == 60
        assert root.mm_leases() == []           # the killed tuner's lease died with it


@pytest.fixture(scope="module")
def sizes(tmp_path_factory):
    """Device bytes of the default model (weights + KV), of a second model, and of a job's lease."""
    from conftest import KernelProc
    from llmos.drivers.default_model import make_tiny_model
    from llmos.services.tuner.jobs import estimate_bytes
    root = tmp_path_factory.mktemp("sizes")
    other = make_tiny_model("qwen3", tmp_path_factory.mktemp("other") / "qwen3")
    args = (*ARGS, "--kv-blocks", "32", "--alias", f"other={other}")
    k = KernelProc(*args, "--device-budget", str(1 << 34), model="default", state=root).start()
    with k.client() as c:
        dev = c.free()["device"]
        row = c.model_load(name="other")
        default = {m["name"]: m for m in c.models()}["llmos-tiny-random"]
        params = dict(PARAMS, epochs=400)
        lease = estimate_bytes(default["path"], params, 1024)
    k.stop()
    k.cleanup()
    return dict(args=args, params=params, resident=dev["weights"] + dev["kv"],
                other=row["bytes"] + row["kv_bytes"], lease=lease)


def budget_kernel(tmp_path, sizes, budget: float):
    from conftest import KernelProc
    k = KernelProc(*sizes["args"], "--device-budget", str(int(budget / 0.95)), model="default",
                   state=tmp_path).start()
    with k.client() as c:
        wait_for(lambda: all(s["state"] == "up" for s in c.svc_list()), timeout=120)
        c.call("fs_put", path="qa.jsonl", data=QA)
    return k


def test_inference_revokes_the_tuners_lease_and_the_job_resumes_after(tmp_path, sizes):
    """A device budget with room for the default model and the job's lease, not also a second
    model: spawning on the second model pauses the job; it resumes when the model is idle."""
    k = budget_kernel(tmp_path, sizes, sizes["resident"] + sizes["lease"] + sizes["other"] // 2)
    try:
        with k.client() as c:
            job = c.call("tune_submit", dataset="qa.jsonl", params=sizes["params"], val_fraction=0.0, name="p")["job"]
            wait_for(lambda: c.call("tune_status", job=job)["step"] > 5, timeout=120)
            assert [x["holder"] for x in c.mm_leases()] == ["svc:tuner"]
            pid = c.spawn(model="other", prompt="hello", max_tokens=4, priority=0)
            assert c.wait(pid, timeout=120)["finish_reason"] in ("length", "stop")
            st = finished(c, job)
            states = [e.get("state") for e in c.call("tune_status", job=job, since=0)["events"]]
            assert "paused" in states and st["state"] == "done", states
            assert st["trials"][0]["steps"] == st["total_steps"]
            assert c.mm_leases() == []
    finally:
        k.stop()
        k.cleanup()


def test_a_lease_that_can_never_fit_fails_the_job_clearly(tmp_path, sizes):
    k = budget_kernel(tmp_path, sizes, sizes["resident"] + sizes["lease"] // 2)
    try:
        with k.client() as c:
            job = c.call("tune_submit", dataset="qa.jsonl", params=sizes["params"], val_fraction=0.0, name="n")["job"]
            st = finished(c, job)
            assert st["state"] == "failed" and st["error"].startswith("ENOMEM: lease of"), st
            assert "can never fit" in st["error"] and c.call("fs_list", prefix="adapters/n") == []
    finally:
        k.stop()
        k.cleanup()


def test_an_idle_tuner_has_not_loaded_torch(start_kernel):
    """torch, transformers and peft load with the first job: a tuner nobody uses stays light."""
    k = start_kernel("--service", "tuner")
    with k.client() as c:
        wait_for(lambda: all(s["state"] == "up" for s in c.svc_list()), timeout=60)
        pid = c.svc_list()[0]["pid"]
    maps = open(f"/proc/{pid}/maps").read()
    assert "libtorch" not in maps and "libc10" not in maps
