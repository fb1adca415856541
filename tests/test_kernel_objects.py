"""Objects with owners: users name models by name and adapters by file-store path, see only
shared models and their own objects, and need capability 'host' for host paths, pins and
others' models. Root (every capability) still does all of it."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import errno_of, wait_for
from fixtures_models import prompt_of, tiny_models  # noqa: F401
from llmos import SyscallError
from llmos.kernel.security import DEFAULT_CAPS, User
from test_driver_lora import adapter_of  # noqa: F401

ARGS = ("--device", "cpu", "--dtype", "float32", "--kv-blocks", "32", "--block-size", "4")


def refusal(fn, *args, **kwargs) -> SyscallError:
    with pytest.raises(SyscallError) as e:
        fn(*args, **kwargs)
    return e.value


def users(k, *names, host=()):
    """Clients for new users; those in ``host`` also get capability 'host'."""
    with k.client() as root:
        return [k.client(root.user_add(n, caps=[*DEFAULT_CAPS, "host"] if n in host else None)["token"])
                for n in names]


@pytest.fixture
def shared(start_kernel, tiny_models):
    """The llama boot model and the alias small (qwen3): both shared base models."""
    return start_kernel(*ARGS, "--alias", f"small={tiny_models['qwen3']}", model=tiny_models["llama"])


def test_new_users_lack_host_and_root_has_it(shared):
    (bob,) = users(shared, "bob")
    assert "host" not in bob.whoami()["caps"] and "host" not in DEFAULT_CAPS
    with shared.client() as root:
        assert "host" in root.whoami()["caps"]


def test_a_users_exported_adapter_is_invisible_and_unusable_to_other_users(start_kernel, tiny_models,
                                                                           adapter_of):
    base = tiny_models["llama"]
    k = start_kernel(*ARGS, "--service", "fs", model=base)
    alice, bob = users(k, "alice", "bob")
    with k.client() as root:
        wait_for(lambda: any(s["name"] == "fs" and s["state"] == "up" for s in root.svc_list()))
    src = Path(adapter_of("llama", "A"))
    for f in src.iterdir():
        alice.call("fs_put", path=f"adapters/mine/{f.name}", data=f.read_bytes())
    pid = alice.spawn(prompt_ids=prompt_of(5), adapter="adapters/mine", max_tokens=3, ignore_eos=True)
    assert alice.pinfo(pid)["adapter"] == "adapters/mine"
    alice.wait(pid)
    with k.client() as root:                                 # root sees the kernel's export...
        (exported,) = [a["name"] for m in root.models() for a in m["adapters"]]
        assert exported.startswith(str(k.state)) and f"/{alice.whoami()['uid']}/" in exported
        assert {a["owner"] for m in root.models() for a in m["adapters"]} == {"alice"}
    # ...its owner sees it by its file-store path; nobody else sees it at all
    (row,) = alice.models()
    assert [(a["name"], a["path"], a["owner"]) for a in row["adapters"]] == [("adapters/mine", None, "alice")]
    for c in (alice, bob):
        assert str(k.state) not in json.dumps([c.models(), c.uname(), c.meminfo()])
    assert [a for m in bob.models() for a in m["adapters"]] == []
    e = refusal(bob.spawn, prompt_ids=prompt_of(5), adapter=exported, max_tokens=3)
    assert e.errno == "EPERM" and "'host'" in e.message
    # the owner may name it by its loaded name; root may use anything
    alice.wait(alice.spawn(prompt_ids=prompt_of(5), adapter=exported, max_tokens=3))
    with k.client() as root:
        root.wait(root.spawn(prompt_ids=prompt_of(5), adapter=exported, max_tokens=3))


def test_a_bad_exported_adapter_is_reported_by_its_file_store_path(start_kernel, tiny_models, adapter_of):
    k = start_kernel(*ARGS, "--service", "fs", model=tiny_models["llama"])
    (alice,) = users(k, "alice")
    with k.client() as root:
        wait_for(lambda: any(s["name"] == "fs" and s["state"] == "up" for s in root.svc_list()))
    alice.call("fs_put", path="adapters/half/notes.txt", data=b"no adapter here")
    e = refusal(alice.spawn, prompt_ids=prompt_of(5), adapter="adapters/half")
    assert e.errno == "ENOENT" and "adapters/half" in e.message and str(k.state) not in e.message


def test_host_paths_are_refused_before_the_filesystem_is_looked_at(shared, tiny_models, tmp_path):
    (bob,) = users(shared, "bob")
    secret = tmp_path / "private"
    secret.mkdir()
    (secret / "diary-of-root.txt").write_text("x")
    missing = str(tmp_path / "no-such-dir")
    for arg in ("model", "adapter"):
        seen = {}
        for path in ("/root", str(secret), missing, tiny_models["qwen2"]):
            e = refusal(bob.spawn, prompt_ids=[10, 11], **{arg: path})
            assert e.errno == "EPERM" and "'host'" in e.message, e.message
            assert "diary" not in e.message and "adapter_config" not in e.message and "config.json" not in e.message
            seen[path] = e.message.replace(path, "P")
        assert len(set(seen.values())) == 1, seen            # the same words whatever is there
    assert errno_of(bob.spawn, model="some-org/some-model", prompt_ids=[10]) == "EPERM"   # a hub id
    assert errno_of(bob.model_load, "/root") == "EPERM"
    assert errno_of(bob.model_load, "no-such-model") == "ENOENT"
    assert bob.ps() == []
    with shared.client() as root:                           # root still names the host freely
        e = refusal(root.spawn, prompt_ids=[10, 11], adapter=str(secret))
        assert e.errno == "ENOENT" and "adapter_config.json" in e.message
        assert errno_of(root.spawn, model="/root", prompt_ids=[10]) in ("ENOENT", "EINVAL")


def test_users_name_models_by_name_and_alias(shared, tiny_models):
    (bob,) = users(shared, "bob")
    for model in (None, "small", tiny_models["llama"]):       # default, alias, the boot model's name
        r = bob.wait(bob.spawn(model=model, prompt_ids=prompt_of(4), max_tokens=2, ignore_eos=True))
        assert len(r["token_ids"]) == 2
    assert {m["name"] for m in bob.models()} == {tiny_models["llama"], "small"}
    assert {m["path"] for m in bob.models()} == {None}        # shared, but where they live is not theirs


def test_twelve_spellings_of_one_directory_are_one_entry(shared, tiny_models):
    p = tiny_models["qwen2"]
    parent, leaf = os.path.split(p)
    spellings = [p + "/." * i for i in range(10)] + [f"{p}/../{leaf}", f"{parent}/./{leaf}/"]
    with shared.client() as root:
        rows = [root.model_load(s, pin=True) for s in spellings]
        assert {r["name"] for r in rows} == {os.path.realpath(p)}
        assert [m["path"] for m in root.models()].count(os.path.realpath(p)) == 1
        assert len(root.models()) == 3                         # the boot model, small, this one
        assert len(root.meminfo()["pools"]) == 2                # one KV pool for it, not twelve
        assert root.model_load(tiny_models["qwen3"])["name"] == "small"   # its alias's directory


def test_pinning_needs_the_host_capability(shared):
    bob, ops = users(shared, "bob", "ops", host=("ops",))
    e = refusal(bob.model_load, "small", pin=True)
    assert e.errno == "EPERM" and "'host'" in e.message
    assert bob.model_load("small")["pinned"] is False
    assert ops.model_load("small", pin=True)["pinned"] is True


def test_others_see_only_shared_models_and_cannot_unload_another_users(shared, tiny_models):
    bob, ops = users(shared, "bob", "ops", host=("ops",))
    private = tiny_models["mistral"]
    assert ops.model_load(private)["owner"] == "ops"
    assert private not in {m["name"] for m in bob.models()} | {m["name"] for m in bob.uname()["models"]}
    assert private not in bob.meminfo()["pools"]
    assert errno_of(bob.model_unload, private) == "EPERM"
    assert errno_of(bob.spawn, model=private, prompt_ids=[10]) == "EPERM"
    bob.model_load("small")                                   # bob loaded it, root owns it
    assert errno_of(bob.model_unload, "small") == "EPERM"
    with shared.client() as root:
        assert {m["name"]: m["owner"] for m in root.models()}[private] == "ops"
        pid = root.spawn(model=private, prompt_ids=prompt_of(4), max_tokens=2, ignore_eos=True)
        assert errno_of(ops.model_unload, private) == "EBUSY"     # host lets ops try: root's process
        root.wait(pid)
        assert root.model_unload("small") is True
    assert ops.model_unload(private) is True                  # the owner, unused


def test_unloading_a_model_with_other_users_processes_needs_host():
    from llmos.kernel import objects
    from llmos.kernel.models import ModelEntry
    owner = User("owner", 1001, frozenset(DEFAULT_CAPS))
    entry = ModelEntry("m", "/models/m", owner_uid=1001)
    mine, theirs = SimpleNamespace(uid=1001, model="m"), SimpleNamespace(uid=1002, model="m")
    objects.check_unload(owner, entry, [mine])
    with pytest.raises(SyscallError) as e:
        objects.check_unload(owner, entry, [mine, theirs])
    assert e.value.errno == "EPERM" and "'host'" in e.value.message
    objects.check_unload(User("ops", 1003, frozenset({*DEFAULT_CAPS, "host"})), entry, [mine, theirs])
