"""Process images in the file store, and processes with a LoRA adapter moved between kernels
(issue 14): the adapter is checked by hash like the model, and the restored process continues
token for token."""
from pathlib import Path

import pytest

from conftest import KernelProc, errno_of, wait_for
from fixtures_models import prompt_of, tiny_models  # noqa: F401
from llmos import SyscallError
from test_driver_lora import adapter_of  # noqa: F401

ARGS = ("--device", "cpu", "--dtype", "float32", "--kv-blocks", "64", "--block-size", "4", "--service", "fs")
NEW = 16


def _kernel(path):
    """A kernel with a file store, and a client of user alice's on it (she sees her adapters by
    their file-store paths)."""
    k = KernelProc(*ARGS, model=path).start()
    with k.client() as c:
        wait_for(lambda: any(s["name"] == "fs" and s["state"] == "up" for s in c.svc_list()))
        return k, k.client(token=c.user_add("alice")["token"])


def _upload(c, src: str, prefix: str) -> None:
    for f in Path(src).iterdir():
        c.call("fs_put", path=f"{prefix}/{f.name}", data=f.read_bytes())


def _reference(c, adapter_dir: str, spawn: dict) -> list[int]:
    """Upload the adapter as adapters/mine and run ``spawn`` to its end: the uninterrupted tokens."""
    _upload(c, adapter_dir, "adapters/mine")
    return c.wait(c.spawn(**spawn))["token_ids"]


def _sampled(seed: int, prompt: list[int]) -> dict:
    return dict(prompt_ids=prompt, adapter="adapters/mine", max_tokens=NEW, temperature=0.9, seed=seed,
                ignore_eos=True)


def test_an_adapter_process_moves_through_the_file_store_token_for_token(tiny_models, adapter_of):
    base = tiny_models["llama"]
    (a, alice_a), (b, alice_b) = _kernel(base), _kernel(base)
    spawn = _sampled(5, prompt_of(7, 3))
    try:
        with alice_a as c:
            whole = _reference(c, adapter_of("llama", "A"), spawn)
            pid = c.spawn(**spawn)
            stream, part = c.read(pid), []
            while len(part) < 4:
                part += next(stream)["token_ids"]
            c.kill(pid, "STOP")
            image = c.checkpoint(pid)
            assert image["adapter"]["name"] == "adapters/mine" and image["adapter"]["hash"]
            wrote = c.checkpoint(pid, path="images/p.img")
            assert wrote["pid"] == pid and wrote["path"] == "images/p.img" and wrote["size"] > 0
            data = c.call("fs_get", path="images/p.img")
            here = c.restore(path="images/p.img")           # the same kernel, from the store
            assert c.pinfo(here)["adapter"] == "adapters/mine" and c.pinfo(here)["state"] == "STOPPED"
            c.kill(here, "CONT")
            assert c.wait(here)["token_ids"] == whole
        with alice_b as c:
            c.call("fs_put", path="images/p.img", data=data)
            with pytest.raises(SyscallError, match="adapters/mine"):       # no such adapter there yet
                c.restore(path="images/p.img")
            _upload(c, adapter_of("llama", "B"), "adapters/mine")         # the name, another adapter
            with pytest.raises(SyscallError, match="adapter 'adapters/mine' here is not the image's"):
                c.restore(path="images/p.img")
            _upload(c, adapter_of("llama", "A"), "adapters/same")
            new = c.restore(path="images/p.img", adapter="adapters/same")  # the same adapter, renamed
            assert c.pinfo(new)["adapter"] == "adapters/same"
            c.kill(new, "CONT")
            rest = c.wait(new)["token_ids"]
            c.call("fs_put", path="images/junk.img", data=b"\xc1 not msgpack")
            assert errno_of(c.restore, path="images/junk.img") == "EINVAL"
            assert errno_of(c.restore, path="images/none.img") == "ENOENT"
            assert errno_of(c.restore, image=image, path="images/p.img") == "EINVAL"   # one of them
            assert errno_of(c.restore) == "EINVAL"
            assert errno_of(c.restore, image={**image, "adapter": "x"}) == "EINVAL"
        assert rest == whole
    finally:
        a.cleanup()
        b.cleanup()


def test_an_adapter_process_survives_a_kernel_sigkill(tiny_models, adapter_of):
    import signal
    k, alice = _kernel(tiny_models["llama"])
    spawn = _sampled(11, prompt_of(6, 9))
    try:
        with alice as c:
            whole = _reference(c, adapter_of("llama", "A"), spawn)
            pid = c.spawn(**spawn, stopped=True)
            k.stop(signal.SIGKILL)
            k.start()
            assert c.pinfo(pid)["adapter"] == "adapters/mine" and c.pinfo(pid)["state"] == "STOPPED"
            c.kill(pid, "CONT")
            assert c.wait(pid)["token_ids"] == whole
    finally:
        k.cleanup()
