"""Process images: ``checkpoint(pid)`` writes a process down, ``restore(image)`` makes a new
process from it, on this kernel or another.

An image is self-contained: the process's record as the journal keeps it (sampling seed,
parameters, turn state, counters), every token, and the model (and adapter) it needs, named and
identified by a hash of what decides their output — the config (less paths and versions) and
the names and sizes of the weight files. ``restore`` refuses an image whose model or adapter
here hashes differently, naming what differs; the restored process then continues exactly as
the original would have (its KV is recomputed from its tokens, not carried). An image is input
like any other: every field is checked, and the new process is the caller's, whatever the
image says.

``checkpoint(pid, path=P)`` writes the image (msgpack) to the caller's file store instead of
returning it, and ``restore(path=P)`` reads it from there. A process with a LoRA adapter needs
the same adapter where it is restored: the image's adapter name (a file-store path such as
``adapters/x`` is exported from the caller's store, as ``spawn`` does) or ``restore(adapter=…)``,
checked by hash like the model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgpack

from llmos.kernel import journal, objects, prompts, restore, systenancy, userfs
from llmos.kernel.proc import NICE_MAX, NICE_MIN, ProcState
from llmos.kernel.procio import PENDING_REPLY
from llmos.kernel.services import answer_later
from llmos.syscalls.errors import SyscallError

FORMAT = "llmos-process/1"
RESTORABLE = ("ready", "running", "swapped", "blocked", "stopped")
_VOLATILE = ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype")


def content_hash(directory: str) -> str:
    """What decides a checkpoint's (or adapter's) output, hashed: its JSON configs without
    paths and versions, and the names and sizes of its other files."""
    root, h = Path(directory), hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(root).as_posix()
        if f.suffix == ".json" and f.name.endswith("config.json"):
            try:
                data = {k: v for k, v in json.loads(f.read_text()).items() if k not in _VOLATILE}
            except (OSError, ValueError):
                data = None
            h.update(f"{rel}={json.dumps(data, sort_keys=True)};".encode())
        elif f.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            h.update(f"{rel}:{f.stat().st_size};".encode())
    return h.hexdigest()[:32]


def checkpoint(k, user, pid: int) -> dict:
    proc = k.table.owned(user, pid)
    if not proc.is_alive:
        raise SyscallError("EINVAL", f"process {pid} has exited: nothing to continue (reap it with wait)")
    entry = proc.entry
    record = entry.adapter_records.get(proc.adapter) if proc.adapter else None
    return {"format": FORMAT, "pid": proc.pid,
            "model": {"name": entry.name, "hash": content_hash(entry.path)},
            "adapter": None if proc.adapter is None else {"name": record.label if record else proc.adapter,
                                                          "hash": content_hash(proc.adapter)},
            "process": journal.fields(proc), "token_ids": list(proc.token_ids)}


def sys_checkpoint(k, call):
    """The image, or where it was written in the caller's file store (``path``)."""
    image = checkpoint(k, call.user, call.args["pid"])
    if call.args["path"] is None:
        return image
    k.services.ask("fs_put", {"path": call.args["path"], "data": msgpack.packb(image)}, call.user,
                   answer_later(k, call, lambda r: {"pid": image["pid"], "path": r["path"], "size": r["size"],
                                                    "sha256": r["sha256"]}))
    return PENDING_REPLY


def sys_restore(k, call):
    """Restore ``image``, or the image at ``path`` in the caller's file store (``owner``'s if
    shared with them); a store adapter is exported first."""
    a = call.args
    if (a["image"] is None) == (a["path"] is None):
        raise SyscallError("EINVAL", "restore takes an image or the path of one in your file store (one of them)")
    if a["image"] is not None:
        return _with_adapter(k, call, a["image"])
    get = {"path": a["path"], **({"owner": a["owner"]} if a["owner"] is not None else {})}
    k.services.ask("fs_get", get, call.user, answer_later(k, call, lambda data: _with_adapter(k, call, _unpack(data))))
    return PENDING_REPLY


def _unpack(data) -> dict:
    try:
        image = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:                # msgpack raises several kinds on foreign bytes
        raise SyscallError("EINVAL", f"that file is not a process image ({type(exc).__name__})")
    if not isinstance(image, dict):
        raise SyscallError("EINVAL", "that file is not a process image")
    return image


def _with_adapter(k, call, image: dict):
    want = image.get("adapter")
    if want is None:
        return restore_image(k, call, image)
    if not isinstance(want, dict) or not isinstance(want.get("name"), str) or not isinstance(want.get("hash"), str):
        raise SyscallError("EINVAL", "process image: bad adapter")
    given = call.args["adapter"] or want["name"]
    if userfs.is_store_path(given):
        return userfs.spawn_with_store_adapter(k, call, lambda a: restore_image(k, call, image, (a["adapter"], given)),
                                               path=given)
    return restore_image(k, call, image, (given, given))


def restore_image(k, call, image: dict, adapter: tuple[str, str] | None = None) -> int:
    """A new process of the caller's from ``image``, with ``adapter`` (its local directory, the
    caller's name for it) where the image has one; EINVAL naming what is wrong or differs."""
    user, ps = _owner(k, call), k.procs
    if image.get("format") != FORMAT:
        raise SyscallError("EINVAL", f"not a process image (format {image.get('format')!r}, expected {FORMAT!r})")
    try:
        want, f, ids = image["model"], dict(image["process"]), list(image["token_ids"])
        entry = objects.resolve_model(ps, user, str(want["name"]))
        here = content_hash(entry.path)
        if here != want["hash"]:
            raise SyscallError("EINVAL", f"model {want['name']!r} here is not the image's (hash {here} here, "
                                         f"{want['hash']} in the image)")
        if adapter is None and f.get("adapter") is not None:     # (_with_adapter resolved any the image names)
            raise SyscallError("EINVAL", "process image: bad adapter")
        _check(f, ids, prompts.vocab_size(entry))
    except SyscallError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SyscallError("EINVAL", f"malformed process image: {type(exc).__name__}: {exc}"[:300])
    from llmos.kernel.sysproc import check_priority
    check_priority(user, f["nice"])
    if len(ids) >= prompts.context_len(entry):
        raise SyscallError("EINVAL", f"the image holds {len(ids)} tokens; the context window is "
                                     f"{prompts.context_len(entry)}")
    systenancy.check_procs(k, user, 1)
    systenancy.check_kv(k, user, len(ids) + 1, entry)
    label = None
    if adapter is not None:
        directory, given = adapter
        here = content_hash(directory) if Path(directory).is_dir() else "none (not a directory)"
        if here != image["adapter"]["hash"]:
            raise SyscallError("EINVAL", f"adapter {given!r} here is not the image's (hash {here} here, "
                                         f"{image['adapter']['hash']} in the image)")
        directory = objects.check_adapter(entry, user, given, {"adapter": directory})["adapter"]
        record = entry.adapter_records.get(directory)
        adapter, label = directory, record.label if record else None
    session = call.session if call.args["uid"] is None else f.get("session")
    f.update(uid=user.uid, ppid=0, adapter=adapter, adapter_label=label, ended_at=None, hup=bool(f.get("hup")),
             session=session if isinstance(session, str) else None)
    try:
        proc = restore.bring_back(ps, entry, k.table.new_pid(), f, ids)
    except (KeyError, TypeError, ValueError) as exc:
        raise SyscallError("EINVAL", f"malformed process image: {type(exc).__name__}: {exc}"[:300])
    return proc.pid


def _owner(k, call):
    """Whose the restored process is: the caller's, or (root, ``uid``) the migrated process's owner's."""
    uid = call.args["uid"]
    if uid is None:
        return call.user
    if not call.user.is_root:
        raise SyscallError("EPERM", "restore(uid=...) is root's (a cluster's front moving a process)")
    return k.users.by_uid(uid)


def _check(f: dict, ids: list, vocab: int) -> None:
    """Every field ``restore.bring_back`` reads, checked (it trusts the journal, not users)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise SyscallError("EINVAL", f"process image: bad {what}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)   # noqa: E731
    need(all(is_int(t) and 0 <= t < vocab for t in ids) and ids, "token_ids")
    need(f.get("state") in RESTORABLE, "state")
    need(f.get("stopped_from") in (None, *RESTORABLE), "stopped_from")
    need(f.get("wait") in (None, "input", "model"), "wait")
    need(f.get("state") != "blocked" or f.get("wait") is not None, "wait")
    need(is_int(f.get("nice")) and NICE_MIN <= f["nice"] <= NICE_MAX, "nice")
    need(is_int(f.get("max_tokens")) and 1 <= f["max_tokens"] <= 1 << 20, "max_tokens")
    for name in ("num_prompt_tokens", "turn_start", "tokens_in", "tokens_out", "num_preemptions", "num_swaps",
                 "num_recomputes", "num_cached_tokens"):
        need(is_int(f.get(name)) and 0 <= f[name] <= 1 << 31, name)
    need(0 < f["turn_start"] <= len(ids) and f["num_prompt_tokens"] <= len(ids), "turn_start")
    need(isinstance(f.get("sampling"), dict) and set(f["sampling"]) <= {"temperature", "top_p", "top_k",
                                                                       "repetition_penalty", "seed"}, "sampling")
    need(isinstance(f.get("stop_token_ids"), list) and all(is_int(t) and 0 <= t < vocab
                                                           for t in f["stop_token_ids"]), "stop_token_ids")
    need(isinstance(f.get("stop"), list) and len(f["stop"]) <= 16
         and all(isinstance(x, str) and 0 < len(x) <= 1024 for x in f["stop"]), "stop")
    need(isinstance(f.get("kg_facts"), list) and all(isinstance(x, str) for x in f["kg_facts"]), "kg_facts")
    for name in ("ignore_eos", "interactive", "turn_done", "close_after_turn"):
        need(isinstance(f.get(name), bool), name)
    need(isinstance(f.get("created_at"), (int, float)), "created_at")
    need(f.get("finish_reason") is None or isinstance(f["finish_reason"], str), "finish_reason")
    need(f.get("turn_finish_reason") is None or isinstance(f["turn_finish_reason"], str), "turn_finish_reason")
    if ProcState(f["state"]) is ProcState.BLOCKED:
        need(f["interactive"] or f["wait"] == "model", "state")
