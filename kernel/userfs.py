"""The kernel's own use of the file store, on a user's behalf.

* ``feedback(pid, rating, correction)``: the process's prompt and latest output (and the
  correction) become one JSON line appended to ``feedback.jsonl`` in the user's file store —
  the dataset ``tune_submit(dataset="feedback")`` trains on.
* ``spawn(adapter="adapters/x")``: an adapter path that is not an absolute local directory
  names a directory in the caller's file store. The kernel asks ``fs`` to export it into a
  local directory named by its content (so a retrained adapter is a new one) and spawns with
  that; a user's ``KEEP_EXPORTS`` most recently used exports stay cached. The export is the
  caller's adapter (``objects.check_adapter`` records it, labelled by its file-store path, which
  is how its owner sees it and how errors name it). Both reply when ``fs`` has answered; the
  loop never waits.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from llmos.kernel import objects
from llmos.kernel.procio import PENDING_REPLY
from llmos.kernel.security import User
from llmos.kernel.services import answer_later
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import FEEDBACK_PATH

KEEP_EXPORTS = 16              # exported adapters kept per user beyond those in use


def sys_feedback(k, call):
    a = call.args
    proc = k.table.owned(call.user, a["pid"])
    io, entry = proc.io, proc.entry
    if not (io.turn_ids or io.text):
        raise SyscallError("EINVAL", f"process {proc.pid} has no output to rate yet")
    if not io.turn_done:
        raise SyscallError("EBUSY", f"process {proc.pid} is still answering; rate it when its turn ends")
    tok = entry.tokenizer
    record = {"prompt": tok.decode(proc.token_ids[:proc.turn_start], skip_special_tokens=True),
              "completion": io.text, "rating": a["rating"], "model": entry.name, "pid": proc.pid,
              "adapter": objects.adapter_label(k.procs.models, call.user, proc.model, proc.adapter), "time": round(time.time(), 3)}
    if a["correction"] is not None:
        record["correction"] = a["correction"]
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    k.services.ask("fs_append", {"path": FEEDBACK_PATH, "data": line}, call.user,
                   answer_later(k, call, lambda r: {"path": FEEDBACK_PATH, "records": r["lines"]}))
    return PENDING_REPLY


def is_store_path(adapter: str | None) -> bool:
    return adapter is not None and not adapter.startswith(("/", "~"))


def spawn_with_store_adapter(k, call, then, path: str | None = None) -> object:
    """Export the caller's adapter directory (``path``, by default the call's ``adapter``) from
    fs, then ``then(args)`` with the local path."""
    path = (path or call.args["adapter"]).strip("/")
    as_kernel = User(call.user.name, call.user.uid, call.user.caps | {"svc"})
    dest = str(k.cfg.state_dir / "cache" / "adapters" / str(call.user.uid))

    def spawn(result):
        if not os.path.isdir(result["dir"]):      # exported by a cluster head on another node
            raise SyscallError("EXDEV", f"adapter {path!r} was exported on the cluster head's node, which this "
                                        "kernel's is not: spawn it on a kernel of that node")
        os.utime(result["dir"])                   # last used: the cache keeps the recent ones
        if result.get("created"):                 # the cache grew: trim it
            prune_cache(k, Path(dest))
        return then({**call.args, "adapter": result["dir"]})
    try:
        k.services.ask("fs_export", {"prefix": path, "dest_root": dest}, as_kernel, answer_later(k, call, spawn))
    except SyscallError as err:
        raise SyscallError(err.errno, f"adapter {path!r} is a file-store path and {err.message}")
    return PENDING_REPLY


def prune_cache(k, root: Path, keep: int = KEEP_EXPORTS) -> None:
    """Drop a user's exported adapters beyond the ``keep`` most recently used, except those a
    live process or a resident model still names (a model coming back reloads from the path)."""
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    if len(dirs) <= keep:
        return
    in_use = {p.adapter for p in k.table.all() if p.adapter}
    drivers = [e.engine.driver if e.engine else e.host_driver for e in k.procs.models.entries.values()]
    in_use |= {a["name"] for d in drivers if d is not None for a in d.adapters()}
    for d in dirs[keep:]:
        if str(d) not in in_use:
            shutil.rmtree(d, ignore_errors=True)
