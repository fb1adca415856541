"""Through the real kernel, for every supported architecture: greedy output equals
transformers' own ``generate``, token for token — alone, batched, with prefix sharing, across
preemption by swap and by recompute, across STOP/CONT, for a forked child, and multi-turn."""
import time

import pytest

from conftest import KernelProc
from fixtures_models import ARCHITECTURES, hf_greedy, prompt_of, tiny_models  # noqa: F401

# A small pool (40 blocks of 4 tokens = 160 tokens) so a handful of processes must preempt.
POOL = ("--kv-blocks", "40", "--block-size", "4", "--max-num-seqs", "8", "--max-batched-tokens", "48",
        "--device", "cpu", "--dtype", "float32")
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def kernels(tiny_models):
    """(arch, preempt mode) -> a running kernel, started on first use, stopped at module end."""
    running: dict[tuple[str, str], KernelProc] = {}

    def get(arch: str, mode: str = "swap") -> KernelProc:
        if (arch, mode) not in running:
            running[(arch, mode)] = KernelProc(*POOL, "--preempt-mode", mode, model=tiny_models[arch]).start()
        return running[(arch, mode)]

    yield get
    for k in running.values():
        k.cleanup()


def run_all(c, prompts, max_tokens, **kw):
    pids = [c.spawn(prompt_ids=p, max_tokens=max_tokens, **GREEDY, **kw) for p in prompts]
    return [c.wait(pid, _timeout=120) for pid in pids]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_alone_and_batched_match_hf_generate(kernels, tiny_models, arch):
    with kernels(arch).client() as c:
        alone = prompt_of(9)
        assert run_all(c, [alone], 12)[0]["token_ids"] == hf_greedy(tiny_models[arch], alone, 12)
        prompts = [prompt_of(n, offset=n) for n in (3, 11, 17, 6)]
        for p, r in zip(prompts, run_all(c, prompts, 12)):
            assert r["token_ids"] == hf_greedy(tiny_models[arch], p, 12)
            assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefix_sharing_skips_compute_and_keeps_output(kernels, tiny_models, arch):
    with kernels(arch).client() as c:
        shared = prompt_of(20, offset=3)
        first, second = shared + [11, 12], shared + [13, 14, 15]
        r1 = run_all(c, [first], 8)[0]
        r2 = run_all(c, [second], 8)[0]
        assert r2["usage"]["cached_tokens"] >= 16         # 4 full blocks of the shared prefix
        assert r1["token_ids"] == hf_greedy(tiny_models[arch], first, 8)
        assert r2["token_ids"] == hf_greedy(tiny_models[arch], second, 8)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_output_survives_preemption(kernels, tiny_models, arch, mode):
    with kernels(arch, mode).client() as c:
        low = [prompt_of(18, offset=40 + i) for i in range(4)]      # 4 x (18+40) tokens > 160
        pids = [c.spawn(prompt_ids=p, max_tokens=40, priority=10, **GREEDY) for p in low]
        urgent = prompt_of(30, offset=7)
        upid = c.spawn(prompt_ids=urgent, max_tokens=40, priority=-10, **GREEDY)
        results = [c.wait(pid, _timeout=120) for pid in pids + [upid]]
        for p, r in zip(low + [urgent], results):
            assert r["token_ids"] == hf_greedy(tiny_models[arch], p, 40)
        key = "swaps" if mode == "swap" else "recomputes"
        assert sum(r["accounting"][key] for r in results) >= 1, results
        # each preemption was announced to the process (before its KV moved), with the mode
        told = [e for r in results for e in r["events"] if e["event"] == "preempted"]
        assert len(told) == sum(r["accounting"]["preemptions"] for r in results) and told[0]["mode"] == mode
        assert all(r["accounting"]["preemptions"] == 0 for r in results[-1:])   # the urgent one


def test_stop_token_ids_end_the_turn(kernels, tiny_models):
    with kernels("llama").client() as c:
        p = prompt_of(7, offset=11)
        want = hf_greedy(tiny_models["llama"], p, 12)
        stop_at = next(i for i in range(3, 12) if want[i] not in want[:i])
        r = run_all(c, [p], 12, stop_token_ids=[want[stop_at]])[0]
        assert r["finish_reason"] == "stop" and r["token_ids"] == want[:stop_at + 1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stop_and_cont_keep_output(kernels, tiny_models, arch):
    with kernels(arch).client() as c:
        p = prompt_of(10, offset=77)
        pid = c.spawn(prompt_ids=p, max_tokens=40, **GREEDY)
        c.kill(pid, "STOP")
        assert c.pinfo(pid)["state"] == "STOPPED"
        out_before = c.pinfo(pid)["tokens_out"]
        time.sleep(0.2)
        assert c.pinfo(pid)["tokens_out"] == out_before      # a stopped process does not run
        c.kill(pid, "CONT")
        assert c.wait(pid, _timeout=120)["token_ids"] == hf_greedy(tiny_models[arch], p, 40)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forked_greedy_child_continues_like_its_parent(kernels, tiny_models, arch):
    with kernels(arch).client() as c:
        p = prompt_of(13, offset=5)
        pid = c.spawn(prompt_ids=p, max_tokens=20, interactive=True, **GREEDY)
        first = next(iter(c.read(pid)))                     # let it generate a little
        assert first["token_ids"]
        (child,) = c.fork(pid, n=1)
        want = hf_greedy(tiny_models[arch], p, 20)
        assert c.wait(pid, _timeout=120)["token_ids"] == want
        assert c.wait(child, _timeout=120)["token_ids"] == want


def test_sampled_children_with_different_seeds_diverge(kernels):
    with kernels("llama").client() as c:
        pid = c.spawn(prompt_ids=prompt_of(12), max_tokens=24, interactive=True, ignore_eos=True)
        list(c.read(pid))                                     # first turn done: BLOCKED with its KV
        kids = c.fork(pid, n=3, seed=100, temperature=1.0)
        outs = []
        for k in kids:
            c.write(k, ids=prompt_of(2, offset=9))
            outs.append(list(c.read(k))[-1])
        texts = [c.wait(k)["token_ids"] for k in kids]
        assert len({tuple(t) for t in texts}) == 3
        # the same seed again gives the same output
        again = c.fork(pid, n=1, seed=100, temperature=1.0)[0]
        c.write(again, ids=prompt_of(2, offset=9))
        assert c.wait(again)["token_ids"] == texts[0]
        c.wait(pid)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_multi_turn_write_equals_the_concatenated_conversation(kernels, tiny_models, arch):
    with kernels(arch).client() as c:
        p1, p2 = prompt_of(8, offset=1), prompt_of(5, offset=2)
        pid = c.spawn(prompt_ids=p1, max_tokens=6, interactive=True, **GREEDY)
        turn1 = list(c.read(pid))
        out1 = [t for f in turn1 for t in f["token_ids"]]
        assert turn1[-1]["finish_reason"] == "length" and c.pinfo(pid)["state"] == "BLOCKED"
        c.write(pid, ids=p2)
        r = c.wait(pid, _timeout=120)
        assert out1 == hf_greedy(tiny_models[arch], p1, 6)
        assert r["token_ids"] == hf_greedy(tiny_models[arch], p1 + out1 + p2, 6)


def test_the_triton_backend_serves_the_kernel(start_kernel, tiny_models):
    """The Triton kernels (run by Triton's interpreter on the CPU) behind a real kernel."""
    k = start_kernel("--device", "cpu", "--dtype", "float32", "--kv-blocks", "32", "--block-size", "4",
                     "--attention-backend", "triton", model=tiny_models["qwen3"])
    with k.client() as c:
        prompts = [prompt_of(6, offset=1), prompt_of(9, offset=2)]
        for p, r in zip(prompts, run_all(c, prompts, 4)):
            assert r["token_ids"] == hf_greedy(tiny_models["qwen3"], p, 4)
    assert "backend triton" in (k.state / "kernel.log").read_text()
