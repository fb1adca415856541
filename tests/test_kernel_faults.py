"""Faults inside a model step end the processes it carried, never the kernel."""
import tempfile
import threading
from pathlib import Path

from fixtures_models import hf_greedy, prompt_of, tiny_models  # noqa: F401
from llmos import connect
from llmos.kernel.loop import Kernel, KernelConfig
from llmos.kernel.security import UserDB
from llmos.syscalls import locate


def test_a_step_that_raises_fails_its_processes_and_the_kernel_goes_on(tiny_models):
    state = Path(tempfile.mkdtemp(prefix="llmos-"))
    users = UserDB(state / "users.json")
    token = users.bootstrap()
    cfg = KernelConfig(state_dir=state, socket=locate.default_socket(state), model=tiny_models["llama"],
                       device="cpu", dtype="float32", kv_blocks=32, block_size=4)
    kernel = Kernel(cfg, users)
    (engine,) = kernel.procs.engines()
    real_execute, calls = engine.driver.execute, []

    def execute_failing_once(plan):           # e.g. the device ran out of memory mid-step
        calls.append(plan.step_id)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (injected)")
        return real_execute(plan)

    engine.driver.execute = execute_failing_once
    loop = threading.Thread(target=kernel.run, daemon=True)
    loop.start()
    try:
        with connect(cfg.socket, token) as c:
            pid = c.spawn(prompt_ids=prompt_of(6), max_tokens=5, ignore_eos=True)
            r = c.wait(pid)
            assert r["finish_reason"] == "error" and "out of memory" in r["events"][-1]["message"]
            p = prompt_of(7, offset=3)
            ok = c.wait(c.spawn(prompt_ids=p, max_tokens=5, ignore_eos=True))
            assert ok["token_ids"] == hf_greedy(tiny_models["llama"], p, 5)
            assert c.meminfo()["blocks_used"] == 0           # the failed process's KV was freed
            c.shutdown()
    finally:
        loop.join(30)
    assert not loop.is_alive()
