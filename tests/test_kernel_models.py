"""Weights paging: page faults, LRU eviction to host or disk, pins, budgets, bad models."""
import json
import shutil
import time


from conftest import errno_of
from fixtures_models import hf_greedy, prompt_of, tiny_models  # noqa: F401

# ~0.7-1.0 MB of weights per tiny model, 32 KV blocks of 4 tokens each (~65 KB):
# 2 MB of device budget holds the boot model and exactly one more.
ARGS = ("--device", "cpu", "--dtype", "float32", "--kv-blocks", "32", "--block-size", "4")
TWO_MODELS = ("--device-budget", str(2_000_000))


def where(c, name) -> str:
    return {m["name"]: m["where"] for m in c.models()}.get(name, "unknown")


def test_spawn_on_a_model_not_resident_is_a_page_fault(start_kernel, tiny_models):
    k = start_kernel(*ARGS, model=tiny_models["llama"])
    with k.client() as c:
        busy = c.spawn(prompt_ids=prompt_of(6), max_tokens=2000, ignore_eos=True, interactive=True)
        next(iter(c.read(busy)))
        qwen = tiny_models["qwen3"]
        p = prompt_of(9, offset=4)
        # From just before the fault to the last moment it is seen waiting (a tiny model loads in
        # a few ms, so the window may hold only a sample or two; one ps call reads both).
        progress = [c.pinfo(busy)["tokens_out"]]
        pid = c.spawn(model=qwen, prompt_ids=p, max_tokens=10, ignore_eos=True)
        states = set()
        while (rows := {r["pid"]: r for r in c.ps()})[pid]["state"] == "BLOCKED":
            states.add("BLOCKED")
            progress.append(rows[busy]["tokens_out"])
        assert "BLOCKED" in states                          # waited for its model...
        assert progress[-1] > progress[0]                   # ...while the other model kept generating
        assert c.wait(pid)["token_ids"] == hf_greedy(qwen, p, 10)
        assert where(c, qwen) == "device" and c.pinfo(busy)["state"] in ("RUNNING", "READY")
        c.kill(busy, "KILL")
        c.wait(busy)


def test_idle_models_are_evicted_lru_to_host_and_come_back_warm(start_kernel, tiny_models):
    k = start_kernel(*ARGS, *TWO_MODELS, model=tiny_models["llama"])
    a, b = tiny_models["mistral"], tiny_models["qwen2"]
    with k.client() as c:
        assert c.model_load(a)["where"] == "device"
        assert c.model_load(b)["where"] == "device"          # no room for both: a goes to host
        assert (where(c, a), where(c, b), where(c, tiny_models["llama"])) == ("host", "device", "device")
        p = prompt_of(7, offset=2)
        assert c.wait(c.spawn(model=a, prompt_ids=p, max_tokens=8, ignore_eos=True))["token_ids"] == \
            hf_greedy(a, p, 8)                               # warm load from host; b evicted
        assert (where(c, a), where(c, b)) == ("device", "host")
        f = c.free()
        d = f["device"]
        assert d["weights"] + d["kv"] + d["adapters"] + d["reserve"] + d["free"] == d["budget"]
        assert f["host"]["weights"] > 0


def test_with_no_host_budget_evicted_models_are_dropped(start_kernel, tiny_models):
    k = start_kernel(*ARGS, *TWO_MODELS, "--host-budget", "0", model=tiny_models["llama"])
    with k.client() as c:
        c.model_load(tiny_models["mistral"])
        c.model_load(tiny_models["qwen2"])
        assert where(c, tiny_models["mistral"]) == "disk"


def test_pinned_and_busy_models_are_never_evicted(start_kernel, tiny_models):
    k = start_kernel(*ARGS, *TWO_MODELS, model=tiny_models["llama"])
    a, b = tiny_models["mistral"], tiny_models["qwen2"]
    with k.client() as c:
        c.model_load(a, pin=True)
        assert errno_of(c.model_load, b) == "ENOMEM"         # only the pinned one could make room
        c.model_unload(a)
        assert where(c, a) == "disk"
        # a model with a live process is busy: another model's process waits for it to end
        busy = c.spawn(model=a, prompt_ids=prompt_of(5), max_tokens=20, interactive=True, ignore_eos=True)
        list(c.read(busy))
        assert errno_of(c.model_load, b) == "EAGAIN"
        pb = prompt_of(6, offset=8)
        waiting = c.spawn(model=b, prompt_ids=pb, max_tokens=6, ignore_eos=True)
        time.sleep(0.3)
        assert c.pinfo(waiting)["state"] == "BLOCKED" and where(c, b) != "device"
        assert errno_of(c.model_unload, a) == "EBUSY"
        c.wait(busy)                                         # a is idle now: b can take its place
        assert c.wait(waiting)["token_ids"] == hf_greedy(b, pb, 6)
        assert where(c, a) == "host" and where(c, b) == "device"


def test_bad_models_get_clear_errors_and_the_kernel_keeps_running(start_kernel, tiny_models, tmp_path):
    k = start_kernel(*ARGS, "--device-budget", "1800000", model=tiny_models["llama"])
    with k.client() as c:
        assert errno_of(c.spawn, model="/no/such/model", prompt="hi") == "ENOENT"
        assert errno_of(c.model_load, "no-such-alias") == "ENOENT"
        assert errno_of(c.model_load, "no-such-org/no-such-model") == "ENOENT"   # a hub id, offline
        assert errno_of(c.model_load, tiny_models["gpt2"]) == "ENOMEM"     # larger than the budget
        assert errno_of(c.model_unload, tiny_models["llama"]) == "EBUSY"   # the boot model
        assert errno_of(c.model_unload, tiny_models["qwen2"]) == "ENOENT"  # never loaded
        torn = tmp_path / "torn"
        shutil.copytree(tiny_models["qwen2"], torn)
        (torn / "model.safetensors").write_bytes(b"\x00" * 64)               # header destroyed
        assert errno_of(c.model_load, str(torn)) == "EINVAL"
        assert errno_of(c.spawn, model=str(torn), prompt_ids=[10]) == "EINVAL"
        bad = tmp_path / "bad"                                              # loads, then fails:
        shutil.copytree(tiny_models["qwen2"], bad)                          # config disagrees with weights
        cfg = json.loads((bad / "config.json").read_text())
        cfg["intermediate_size"] *= 2
        (bad / "config.json").write_text(json.dumps(cfg))
        pid = c.spawn(model=str(bad), prompt_ids=[10, 11], max_tokens=3)
        r = c.wait(pid)
        assert r["finish_reason"] == "error" and "cannot load" in r["events"][0]["message"]
        p = prompt_of(5)
        assert c.wait(c.spawn(prompt_ids=p, max_tokens=4, ignore_eos=True))["token_ids"] == \
            hf_greedy(tiny_models["llama"], p, 4)


def test_aliases_name_models(start_kernel, tiny_models):
    k = start_kernel(*ARGS, "--alias", f"small={tiny_models['qwen3']}", model=tiny_models["llama"])
    with k.client() as c:
        p = prompt_of(6, offset=3)
        r = c.wait(c.spawn(model="small", prompt_ids=p, max_tokens=5, ignore_eos=True))
        assert r["token_ids"] == hf_greedy(tiny_models["qwen3"], p, 5)
        row = {m["name"]: m for m in c.models()}["small"]
        assert row["where"] == "device" and row["architecture"] == "Qwen3ForCausalLM" and row["params"] > 0


def test_models_of_less_important_users_are_evicted_first(start_kernel, tiny_models):
    # room for the boot model and two more: a third evicts one of them
    k = start_kernel(*ARGS, "--device-budget", "2700000", model=tiny_models["llama"])
    older, newer, third = tiny_models["mistral"], tiny_models["qwen2"], tiny_models["qwen3"]
    with k.client() as c:
        c.wait(c.spawn(model=older, prompt_ids=[10, 11], max_tokens=2, priority=-10))   # important user
        c.wait(c.spawn(model=newer, prompt_ids=[10, 11], max_tokens=2, priority=10))    # batch job
        c.model_load(third)
        # plain LRU would take the older model; the batch job's model goes instead
        assert (where(c, older), where(c, newer), where(c, third)) == ("device", "host", "device")




def test_a_load_takes_a_busy_model_only_from_less_important_processes(start_kernel, tiny_models):
    k = start_kernel(*ARGS, *TWO_MODELS, model=tiny_models["llama"])
    a, b = tiny_models["mistral"], tiny_models["qwen2"]
    pa, pb = prompt_of(7, offset=5), prompt_of(6, offset=9)
    with k.client() as c:
        low = c.spawn(model=a, prompt_ids=pa, max_tokens=40, priority=10, ignore_eos=True)
        next(iter(c.read(low)))                                  # a is busy generating
        urgent = c.spawn(model=b, prompt_ids=pb, max_tokens=8, priority=-10, ignore_eos=True)
        assert c.wait(urgent)["token_ids"] == hf_greedy(b, pb, 8)  # b got a's place...
        r = c.wait(low)                                          # ...and a came back for its process
        assert r["token_ids"] == hf_greedy(a, pa, 40)            # exact after recompute
        assert r["accounting"]["recomputes"] >= 1
        assert {"event": "preempted", "mode": "recompute"} in r["events"]
        # a more important process is never pushed aside: the other model waits instead
        vip = c.spawn(model=a, prompt_ids=pa, max_tokens=100, priority=-10, ignore_eos=True, interactive=True)
        next(iter(c.read(vip)))
        waiting = c.spawn(model=b, prompt_ids=pb, max_tokens=4, priority=0, ignore_eos=True)
        time.sleep(0.3)
        assert c.pinfo(waiting)["state"] == "BLOCKED" and c.pinfo(vip)["preemptions"] == 0
        c.kill(vip, "KILL")
        c.wait(vip)
        assert c.wait(waiting)["token_ids"] == hf_greedy(b, pb, 4)


def test_a_parked_conversation_comes_back_between_turns(start_kernel, tiny_models):
    k = start_kernel(*ARGS, *TWO_MODELS, model=tiny_models["llama"])
    a, b = tiny_models["mistral"], tiny_models["qwen2"]
    p1, p2 = prompt_of(6, offset=1), prompt_of(4, offset=2)
    with k.client() as c:
        chat = c.spawn(model=a, prompt_ids=p1, max_tokens=6, priority=10, ignore_eos=True, interactive=True)
        out1 = [t for f in c.read(chat) for t in f["token_ids"]]
        c.wait(c.spawn(model=b, prompt_ids=[10, 11], max_tokens=2, priority=-10))   # takes a's place
        wait_until = time.monotonic() + 20
        while c.pinfo(chat)["preemptions"] == 0 or where(c, a) != "device":     # a returns for it
            assert time.monotonic() < wait_until
            time.sleep(0.05)
        assert c.pinfo(chat)["state"] == "BLOCKED"                                 # still between turns
        c.write(chat, ids=p2)
        assert c.wait(chat)["token_ids"] == hf_greedy(a, p1 + out1 + p2, 6)
