"""Tuning jobs: their durable state, and the worker that runs them one at a time.

A job lives in ``<service dir>/jobs/<id>/``: ``job.json`` (state, trials, metrics; replaced
atomically), its data split at submission (``train.jsonl``, ``val.jsonl``) and one directory
per trial with checkpoints. After a tuner restart (even SIGKILL) unfinished jobs are queued
again and every trial continues from its last checkpoint. The worker leases device memory
before training, and when the kernel revokes the lease it checkpoints, gives the memory back
(state ``paused``) and waits for a new lease. The winning trial's adapter, its metrics and the
job's record land in the submitter's file store under ``adapters/<name>/`` —
``adapter_config.json`` last, so a directory that has it is complete.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import traceback
from pathlib import Path

from llmos.services.tuner import search as searchlib
from llmos.services.tuner.dataset import load_jsonl
from llmos.services.tuner.remote import LeaseHolder, UserFs
from llmos.services.tuner.params import METRICS_FILE
from llmos.syscalls.errors import SyscallError

LIVE = ("queued", "waiting", "running", "paused")
PUBLISHED = ("adapter_model.safetensors", METRICS_FILE, "tune.json", "adapter_config.json")  # config last
MAX_EVENTS = 200


class Stop(Exception):
    """The job is to stop here (cancelled, or the tuner is shutting down)."""


class JobStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.jobs: dict[str, dict] = {}
        self.cancel: set[str] = set()
        for path in sorted(root.glob("*/job.json")):
            job = json.loads(path.read_text())
            if job["state"] in LIVE:
                job["state"] = "queued"
                event(job, "requeued", message="the tuner restarted; continuing from checkpoints")
            self.jobs[job["job"]] = job
        self.next_id = 1 + max((int(j.split("-")[-1]) for j in self.jobs), default=0)

    def new_id(self) -> str:
        with self.lock:
            jid, self.next_id = f"tune-{self.next_id}", self.next_id + 1
            return jid

    def dir(self, job: dict) -> Path:
        return self.root / job["job"]

    def save(self, job: dict) -> None:
        with self.lock:
            d = self.dir(job)
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / "job.json.tmp"
            tmp.write_text(json.dumps(job))
            os.replace(tmp, d / "job.json")
            self.jobs[job["job"]] = job

    def next_runnable(self) -> dict | None:
        with self.lock:
            queued = [j for j in self.jobs.values() if j["state"] == "queued"]
            return min(queued, key=lambda j: (j["priority"], j["created"]), default=None)

    def public(self, job: dict, since: int | None = None) -> dict:
        with self.lock:
            row = {k: v for k, v in job.items() if k not in ("events", "base_path")}
            row["destination"] = job["adapter"]                   # where the adapter will land
            row["adapter"] = job["adapter"] if job["state"] == "done" else None
            row["trials"] = [dict(t) for t in job["trials"]]
            events = job["events"]
            row["events"] = events[since:] if since is not None else events[-10:]
            row["next_event"] = len(events)
            return row


def event(job: dict, kind: str, **fields) -> None:
    job["events"].append({"t": round(time.time(), 3), "event": kind, **fields})
    del job["events"][:-MAX_EVENTS]


def full_steps(params: dict, num_train: int) -> int:
    steps = math.ceil(num_train / params.get("batch_size", 4)) * params.get("epochs", 1)
    return min(steps, params["max_steps"]) if params.get("max_steps") else steps


def estimate_bytes(model_path: str, params: dict, max_len: int) -> int:
    """Device memory a run needs: fp32 weights, LoRA weights with their gradients and Adam
    state, and activations (a rough upper estimate)."""
    files = list(Path(model_path).glob("*.safetensors")) or list(Path(model_path).glob("*.bin"))
    on_disk = sum(f.stat().st_size for f in files)
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or 1024
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or 24
    scale = 2 if str(cfg.get("torch_dtype", cfg.get("dtype", "float32"))) in ("bfloat16", "float16") else 1
    lora = params.get("rank", 8) * hidden * 2 * layers * 4 * 4 * 4
    acts = params.get("batch_size", 4) * max_len * hidden * layers * 40
    return int(on_disk * scale + lora + acts + (8 << 20))


def steps_left(job: dict, rung: int) -> int:
    """Training steps until the job is done: what this rung's trials still have to train, and
    the rungs after it (survivors continue from where they stopped)."""
    plan = searchlib.rungs(job["search"])
    budgets = {t["id"]: full_steps(t["params"], job["num_train"]) for t in job["trials"]}
    alive = [t for t in job["trials"] if t["state"] != "pruned"]
    left = sum(max(0, math.ceil(budgets[t["id"]] * plan[rung][1]) - t["steps"]) for t in alive
               if not (t["state"] == "done" and t["rung"] == rung))
    mean = sum(budgets.values()) / max(1, len(budgets))
    for i in range(rung + 1, len(plan)):
        left += plan[i][0] * mean * (plan[i][1] - plan[i - 1][1])
    return int(left)


class Runner:
    """The worker thread's job loop."""

    def __init__(self, store: JobStore, connect):
        self.store, self.connect = store, connect
        self.device: str | None = None       # chosen when the first job runs (torch loads then)
        self.wake = threading.Event()
        self.stopping = False

    def _start_torch(self) -> None:
        """torch, transformers and peft load with the first job, not at the service's start."""
        import torch

        from llmos.services.tuner.train import train_lora
        self.train_lora = train_lora
        if "OMP_NUM_THREADS" not in os.environ:     # leave cores to the kernel's inference
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def loop(self) -> None:
        client = self.connect()
        while not self.stopping:
            job = self.store.next_runnable()
            if job is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            if self.device is None:
                self._start_torch()
            self.run(client, job)

    # -- one job -----------------------------------------------------------------------------
    def run(self, client, job: dict) -> None:
        lease = LeaseHolder(client)
        try:
            self._set(job, "waiting", message="leasing device memory")
            self._lease(job, lease)
            self._set(job, "running", message="")
            for index, (keep, fraction) in enumerate(searchlib.rungs(job["search"])):
                if index < job["rung"]:
                    continue
                alive = [t for t in job["trials"] if t["state"] != "pruned"]
                alive.sort(key=lambda t: (t["eval_loss"] if t["eval_loss"] is not None else math.inf))
                for t in alive[keep:]:
                    t["state"] = "pruned"
                    event(job, "pruned", trial=t["id"], eval_loss=t["eval_loss"])
                for t in sorted(alive[:keep], key=lambda t: t["id"]):
                    self._train(job, t, index, fraction, lease)
                job["rung"] = index + 1
                self.store.save(job)
            best = min((t for t in job["trials"] if t["state"] == "done"),
                       key=lambda t: t["eval_loss"] if t["eval_loss"] == t["eval_loss"] else math.inf)
            job["best_trial"] = best["id"]
            self._publish(client, job, best)
            self._drop_trials(job)
            self._set(job, "done", finished=time.time(), message="")
        except Stop:
            if job["job"] in self.store.cancel:
                self._drop_trials(job)
                self._set(job, "cancelled", finished=time.time(), message="cancelled")
        except SyscallError as err:
            self._set(job, "failed", error=f"{err.errno}: {err.message}", finished=time.time())
        except Exception as exc:                      # a bug fails the job, never the tuner
            self._set(job, "failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
            traceback.print_exc()
        finally:
            lease.release()

    def _drop_trials(self, job: dict) -> None:
        """The trials' checkpoints and rung adapters: not needed once the job has ended."""
        for t in job["trials"]:
            shutil.rmtree(self.store.dir(job) / f"trial-{t['id']}", ignore_errors=True)

    def _stop_asked(self, job: dict) -> bool:
        return self.stopping or job["job"] in self.store.cancel

    def _lease(self, job: dict, lease: LeaseHolder) -> None:
        def waiting(why):
            job["message"] = f"waiting for device memory: {why}"
        if not lease.acquire(job["lease_bytes"], job["priority"], f"tune {job['job']}",
                             give_up=lambda: self._stop_asked(job), on_wait=waiting):
            raise Stop()

    def _train(self, job: dict, t: dict, rung: int, fraction: float, lease: LeaseHolder) -> None:
        budget = full_steps(t["params"], job["num_train"])
        target = max(1, min(budget, math.ceil(budget * fraction)))
        tdir = self.store.dir(job) / f"trial-{t['id']}"
        out = tdir / f"rung-{rung}"
        job["trial"], t["state"], t["target_steps"] = t["id"], "running", target
        job["step"], job["total_steps"] = t["steps"], target
        event(job, "trial", trial=t["id"], rung=rung, target_steps=target, params=t["params"])
        self.store.save(job)
        d = self.store.dir(job)
        train = load_jsonl((d / "train.jsonl").read_text()).records
        val = load_jsonl((d / "val.jsonl").read_text()).records if job["num_val"] else train
        params = {**t["params"], "max_steps": target, "checkpoint_dir": str(tdir / "ckpt"),
                  "keep_checkpoint": True, "checkpoint_every": max(1, min(10, budget // 5))}
        last_save = [0.0]

        def progress(p):
            t["steps"], t["loss"], t["eval_loss"] = p["step"], p["loss"], p["eval_loss"]
            job.update(step=p["step"], loss=p["loss"], eval_loss=p["eval_loss"])
            rate = job.get("tokens_per_s") or p["tokens_per_s"]
            job["tokens_per_s"] = round(0.8 * rate + 0.2 * p["tokens_per_s"], 1)
            step_s = p.get("step_s")
            job["eta_s"] = round(step_s * steps_left(job, rung), 1) if step_s else None
            if time.monotonic() - last_save[0] > 1.0:
                last_save[0] = time.monotonic()
                event(job, "progress", trial=t["id"], step=p["step"], loss=p["loss"], eval_loss=p["eval_loss"])
                self.store.save(job)

        while True:
            if out.exists() and (out / METRICS_FILE).exists():     # finished before a restart
                m = json.loads((out / METRICS_FILE).read_text())
                result = {"state": "done", "step": m["steps"], "final_eval_loss": m["final_eval_loss"],
                          "initial_eval_loss": m["initial_eval_loss"]}
            else:
                result = self.train_lora(job["base_path"], train, val, params, out, self.device, progress,
                                    should_stop=lambda: self._stop_asked(job) or lease.revoked())
            if result["state"] == "done":
                break
            if self._stop_asked(job):
                raise Stop()
            lease.release()                                  # revoked: checkpointed; give it back
            self._set(job, "paused", message="lease revoked for inference; resumes when memory returns")
            self._lease(job, lease)
            self._set(job, "running", message="")
        if result.get("resumed_from_step"):
            t["resumed_from_step"] = result["resumed_from_step"]
        t.update(state="done", steps=result["step"], eval_loss=result["final_eval_loss"],
                 initial_eval_loss=result["initial_eval_loss"], rung=rung, adapter_dir=str(out))
        if job.get("initial_eval_loss") is None:
            job["initial_eval_loss"] = result["initial_eval_loss"]
        job["eval_loss"] = result["final_eval_loss"]
        event(job, "trial_done", trial=t["id"], rung=rung, eval_loss=t["eval_loss"], steps=t["steps"])
        self.store.save(job)

    def _publish(self, client, job: dict, best: dict) -> None:
        fs, dest = UserFs(client, job["uid"]), job["adapter"]
        src = Path(best["adapter_dir"])
        record = {k: job[k] for k in ("job", "base_model", "dataset", "params", "search", "num_train",
                                      "num_val", "best_trial", "initial_eval_loss", "priority")}
        record["trials"] = job["trials"]
        files = {"tune.json": json.dumps(record, indent=2).encode()}
        written = []
        try:
            fs.rm(f"{dest}/adapter_config.json")             # an old adapter here is incomplete now
            for name in PUBLISHED:
                data = files.get(name) or (src / name).read_bytes()
                fs.put(f"{dest}/{name}", data)
                written.append(name)
        except BaseException:
            for name in written:
                try:
                    fs.rm(f"{dest}/{name}")
                except SyscallError:
                    pass
            raise
        event(job, "published", adapter=dest)

    def _set(self, job: dict, state: str, **fields) -> None:
        job.update(state=state, **fields)
        event(job, "state", state=state, **{k: v for k, v in fields.items() if k in ("message", "error")})
        self.store.save(job)


def init_trials(job: dict, sampled: list[dict]) -> None:
    job["trials"] = [{"id": i, "params": p, "state": "pending", "steps": 0, "target_steps": 0,
                      "loss": None, "eval_loss": None, "initial_eval_loss": None, "rung": None}
                     for i, p in enumerate(sampled)]
