"""LoRA adapters through the kernel: mixed-adapter batches equal peft's merged models."""
import pytest

from fixtures_models import prompt_of, tiny_models  # noqa: F401
from llmos import SyscallError
from test_driver_lora import adapter_of, make_adapter, merged_greedy  # noqa: F401

ARGS = ("--device", "cpu", "--dtype", "float32", "--kv-blocks", "64", "--block-size", "4")
N = 10


def spawn_all(c, jobs):
    """jobs: [(adapter path or None, prompt)] -> results, all spawned before any is awaited."""
    pids = [c.spawn(prompt_ids=p, adapter=a, max_tokens=N, ignore_eos=True) for a, p in jobs]
    return [c.wait(pid) for pid in pids]


@pytest.mark.parametrize("slots", ["4", "1"])
def test_processes_with_different_adapters_and_none_match_peft_merged(start_kernel, tiny_models,
                                                                       adapter_of, slots):
    base = tiny_models["llama"]
    a, b = adapter_of("llama", "A"), adapter_of("llama", "B")
    k = start_kernel(*ARGS, "--adapter-slots", slots, model=base)
    jobs = [(a, prompt_of(7, 1)), (b, prompt_of(11, 2)), (None, prompt_of(5, 3)), (a, prompt_of(9, 4))]
    with k.client() as c:
        for (adapter, p), r in zip(jobs, spawn_all(c, jobs)):
            assert r["token_ids"] == merged_greedy(base, adapter, p, N), adapter
        row = {m["name"]: m for m in c.models()}[base]
        assert {x["name"] for x in row["adapters"]} == {a, b}
        assert c.free()["host"]["adapters"] > 0


def test_an_adapter_changes_the_answer_and_never_shares_the_base_kv(start_kernel, tiny_models, adapter_of):
    base = tiny_models["qwen3"]
    a = adapter_of("qwen3", "B")
    k = start_kernel(*ARGS, model=base)
    p = prompt_of(21, 5)
    with k.client() as c:
        plain = spawn_all(c, [(None, p)])[0]
        first = spawn_all(c, [(a, p)])[0]
        again = spawn_all(c, [(a, p)])[0]
        assert first["token_ids"] != plain["token_ids"]
        assert first["usage"]["cached_tokens"] == 0          # base-model KV is not this adapter's KV
        assert again["usage"]["cached_tokens"] >= 16         # but the adapter's own prefix is reused
        assert again["token_ids"] == first["token_ids"] == merged_greedy(base, a, p, N)


def test_a_forked_child_keeps_its_parents_adapter(start_kernel, tiny_models, adapter_of):
    base, a = tiny_models["llama"], adapter_of("llama", "C")
    k = start_kernel(*ARGS, model=base)
    p = prompt_of(8, 6)
    with k.client() as c:
        pid = c.spawn(prompt_ids=p, adapter=a, max_tokens=N, ignore_eos=True, interactive=True)
        next(iter(c.read(pid)))
        (child,) = c.fork(pid)
        assert c.pinfo(child)["adapter"] == a
        want = merged_greedy(base, a, p, N)
        assert c.wait(pid)["token_ids"] == want and c.wait(child)["token_ids"] == want


def test_bad_adapters_are_refused_and_the_kernel_keeps_serving(start_kernel, tiny_models, tmp_path):
    base = tiny_models["llama"]
    k = start_kernel(*ARGS, model=base)
    other = make_adapter(tiny_models["gpt2"], tmp_path / "gpt2-adapter", "gpt2")
    with k.client() as c:
        for adapter, errno in ((str(tmp_path / "missing"), "ENOENT"), (other, "EINVAL")):
            with pytest.raises(SyscallError) as e:
                c.spawn(prompt_ids=[10, 11], adapter=adapter)
            assert e.value.errno == errno and e.value.message
        assert c.ps() == []                                  # nothing half-made was left behind
        assert len(c.wait(c.spawn(prompt_ids=[10, 11], max_tokens=3, ignore_eos=True))["token_ids"]) == 3
