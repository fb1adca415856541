"""The ``tuner`` service: LoRA fine-tuning jobs and hyperparameter search behind the ABI.

``tune_submit`` checks everything it can before answering — the dataset (read from the
caller's file store, validated with line numbers, cleaned, de-duplicated, split), the base
model, the parameters, the search space — and queues a job; a worker thread runs jobs one at
a time, most important first (see ``llmos.services.tuner.jobs``). The other calls read or
cancel jobs; a user sees only their own jobs (root sees all).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

from llmos.services.base import Service
from llmos.services.tuner import search as searchlib
from llmos.services.tuner.dataset import Dataset, Record, load_jsonl
from llmos.services.tuner.jobs import LIVE, JobStore, Runner, estimate_bytes, event, init_trials
from llmos.services.tuner.remote import UserFs
from llmos.services.tuner.params import TrainParams
from llmos.syscalls.client import Client
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import FEEDBACK_PATH, Arg, Syscall

FEEDBACK = "feedback"                 # tune_submit(dataset="feedback"): the feedback() records
MAX_DATASET = 64 << 20                # checked while the caller waits: keep that short
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_JOB = Arg("job", "str", required=True, max_len=64)
CALLS = (
    Syscall(0, "tune_submit", (
        Arg("dataset", "str", required=True, max_len=4096,
            doc="JSONL in your file store (chat 'messages' or prompt/completion; up to 64 MiB), or 'feedback'"),
        Arg("base_model", "str", max_len=512, doc="a kernel model name or a model directory; default: "
                                                  "the kernel's default model"),
        Arg("method", "str", default="lora", choices=("lora",)),
        Arg("params", "map", max_len=64, doc="rank, alpha, dropout, target_modules, lr, epochs, batch_size, "
                                             "max_steps, seed, weight_decay, max_tokens"),
        Arg("search", "map", max_len=16, doc="{space: {param: [values] | {min, max, log}}, trials, "
                                             "strategy: random | halving, eta}"),
        Arg("priority", "int", default=10, min=-20, max=19,
            doc="nice value; inference at this priority or more important may pause the job"),
        Arg("name", "str", max_len=64, doc="the adapter lands in adapters/<name>/ (default: the job id)"),
        Arg("val_fraction", "float", default=0.1, min=0.0, max=0.5,
            doc="held out for validation; 0 = validate on the training set")),
        cap="tune", doc="Queue a LoRA fine-tuning job (or a search); the adapter lands in your file store.",
        returns="{job, adapter, num_train, num_val, trials, report}"),
    Syscall(0, "tune_status", (_JOB, Arg("since", "int", min=0, doc="events from this index on")), cap="tune",
            doc="A job: state, trial, step, loss, eval loss, tokens/s, ETA, every trial, events; "
                "adapter (a file-store path) once done.", returns="{job, state, ...}"),
    Syscall(0, "tune_list", cap="tune", doc="Your jobs (root: everyone's).", returns="[{job, state, ...}]"),
    Syscall(0, "tune_cancel", (_JOB,), cap="tune",
            doc="Cancel a job: it stops at the next step; nothing is published.", returns="{job, state}"),
)


class TunerService(Service):
    name = "tuner"
    calls = CALLS
    threaded = frozenset({"tune_submit"})    # it reads the dataset through the kernel

    def setup(self) -> None:
        self.store = JobStore(Path(os.environ.get("LLMOS_SERVICE_DIR", ".")) / "jobs")
        self.runner = Runner(self.store, self.kernel_client)
        threading.Thread(target=self.runner.loop, name="tuner-worker", daemon=True).start()
        self._local = threading.local()

    def handlers(self):
        return {"tune_submit": self.submit, "tune_status": self.status, "tune_list": self.list,
                "tune_cancel": self.cancel}

    @property
    def kernel(self) -> Client:
        """This thread's client (submissions run on worker threads; a Client is one thread's)."""
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = self.kernel_client()
        return c

    # -- calls -------------------------------------------------------------------------------
    def submit(self, caller, dataset, base_model, method, params, search, priority, name, val_fraction):
        if priority < 0 and caller["uid"] != 0 and "prio" not in caller.get("caps", ()):
            raise SyscallError("EPERM", f"priority {priority} < 0 needs capability 'prio'")
        params = dict(params or {})
        base_name, base_path = self._base_model(caller, base_model)
        if search is not None:
            search = searchlib.check(search)
            sampled = searchlib.sample(search, params)
        else:
            search = {"space": {}, "trials": 1, "strategy": "random", "eta": 3, "seed": 0}
            sampled = [params]
        for p in sampled:                                              # EINVAL on bad params
            TrainParams.from_dict(p)
        if name is not None and not _NAME.match(name):
            raise SyscallError("EINVAL", "name: letters, digits, '.', '_', '-' (at most 64)")
        records = self._records(caller["uid"], dataset, 8 * max(p.get("max_tokens", 1024) for p in sampled))
        seed = params.get("seed", 0)
        train, val = (records, Dataset([], {})) if val_fraction == 0 else records.split(val_fraction, seed)
        if not len(train):
            raise SyscallError("EINVAL", f"dataset {dataset!r}: no training records left after the split")
        jid = self.store.new_id()
        max_len = max(p.get("max_tokens", 1024) for p in sampled)
        job = {"job": jid, "uid": caller["uid"], "user": caller["user"], "state": "queued",
               "created": time.time(), "finished": None, "dataset": dataset, "base_model": base_name,
               "base_path": base_path, "method": method, "params": params, "search": search,
               "priority": priority, "adapter": f"adapters/{name or jid}", "num_train": len(train),
               "num_val": len(val), "report": records.report, "rung": 0, "trial": None, "step": 0,
               "total_steps": 0, "loss": None, "eval_loss": None, "initial_eval_loss": None,
               "tokens_per_s": None, "eta_s": None, "best_trial": None, "error": None, "message": "",
               "lease_bytes": max(estimate_bytes(base_path, p, min(max_len, 4096)) for p in sampled),
               "events": []}
        init_trials(job, sampled)
        d = self.store.dir(job)
        d.mkdir(parents=True)
        (d / "train.jsonl").write_text(train.to_jsonl())
        (d / "val.jsonl").write_text(val.to_jsonl())
        event(job, "state", state="queued")
        self.store.save(job)
        self.runner.wake.set()
        return {"job": jid, "adapter": job["adapter"], "num_train": len(train), "num_val": len(val),
                "trials": len(sampled), "report": records.report}

    def status(self, caller, job, since):
        return self.store.public(self._job(caller, job), since)

    def list(self, caller):
        with self.store.lock:
            jobs = [j for j in self.store.jobs.values() if caller["uid"] == 0 or j["uid"] == caller["uid"]]
        return [self.store.public(j) | {"events": []} for j in sorted(jobs, key=lambda j: j["created"])]

    def cancel(self, caller, job):
        j = self._job(caller, job)
        with self.store.lock:
            if j["state"] not in LIVE:
                raise SyscallError("EINVAL", f"job {job} is already {j['state']}")
            self.store.cancel.add(job)
            if j["state"] == "queued":                 # not started: nothing to stop
                j.update(state="cancelled", finished=time.time(), message="cancelled")
                event(j, "state", state="cancelled")
                self.store.save(j)
        return {"job": job, "state": j["state"]}

    # -- helpers -----------------------------------------------------------------------------
    def _job(self, caller, jid: str) -> dict:
        j = self.store.jobs.get(jid)
        if j is None or (caller["uid"] != 0 and j["uid"] != caller["uid"]):
            raise SyscallError("ENOENT", f"no job {jid}")
        return j

    def _base_model(self, caller, name: str | None) -> tuple[str, str]:
        """The kernel model ``name`` (or the default) that ``caller`` may use: a shared one or
        their own; any model, or a model directory, only with capability 'host' (as spawn)."""
        host = caller["uid"] == 0 or "host" in caller.get("caps", ())
        models = [m for m in self.kernel.uname()["models"]
                  if host or m.get("owner") in ("root", caller.get("user"))]
        for m in models:
            if (name is None and m.get("default")) or (name is not None and m["name"] == name):
                return m["name"], m["path"]
        if name is not None and host and Path(name).is_dir() and (Path(name) / "config.json").exists():
            return name, name
        known = ", ".join(m["name"] for m in models) or "none"
        raise SyscallError("ENOENT", f"no model {name!r} (the kernel knows: {known}; or, with capability "
                                     f"'host', give a model directory)" if name else
                           "the kernel has no default model")

    def _records(self, uid: int, dataset: str, max_chars: int) -> Dataset:
        fs = UserFs(self.kernel, uid)
        path = FEEDBACK_PATH if dataset == FEEDBACK else dataset
        try:
            data = fs.read(path, max_bytes=MAX_DATASET)
        except SyscallError as err:
            raise SyscallError(err.errno, f"dataset {dataset!r}: {err.message}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SyscallError("EINVAL", f"dataset {dataset!r} is not UTF-8 text: {exc}")
        if dataset == FEEDBACK:
            text = feedback_to_jsonl(text)
        return load_jsonl(text, max_chars=max_chars)


def feedback_to_jsonl(text: str) -> str:
    """Feedback records worth learning from: a correction, else an output rated good."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        target = r.get("correction") or (r.get("completion") if r.get("rating", 0) > 0 else None)
        if target:
            out.append(json.dumps(Record(prompt=r["prompt"], completion=target).to_json()))
    if not out:
        raise SyscallError("EINVAL", "no usable feedback yet: rate outputs with feedback(pid, 1) or give "
                                     "corrections")
    return "\n".join(out) + "\n"
