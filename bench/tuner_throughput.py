"""Training tokens/s of a tuner job vs a plain peft + torch loop, same data and settings.

    python bench/tuner_throughput.py [--shape bench-llama|tiny|qwen3-0.6b] [--records 256]
        [--epochs 2] [--batch-size 8] [--threads 1] [--repeats 3]

The tuner job goes through everything a user's job does: the dataset is read from the file
store, a memory lease is taken, progress is saved, the adapter is published to the file store.
Its time is the span from its trial starting to the trial's end (the job's events: loading the
model, evaluating before training and after each epoch, training, checkpoints); the plain loop
is timed over the same work: loading, the same evaluations, training, saving the adapter. The same records are
tokenized identically, so both sides train on the same number of tokens. Reports the median
of ``--repeats`` runs of each and their ratio (target: the tuner >= 0.9x the plain loop).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time

import _common

PARAMS = dict(rank=8, alpha=16, lr=1e-3, batch_size=8, seed=0, max_tokens=256)


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta kernel model token adapter memory process answer question".split()
    return [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) + "?",
             "completion": " " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))}
            for _ in range(n)]


def plain_loop(path: str, rows: list[dict], params: dict, epochs: int) -> tuple[float, int]:
    """peft + torch with nothing around it, evaluating when the tuner does (before training and
    after each epoch, on the training set as ``val_fraction=0`` asks): (seconds from loading the
    model to the last evaluation, tokens trained)."""
    import torch
    t0 = time.perf_counter()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmos.services.tuner.dataset import Record
    from llmos.services.tuner.train import _batches, _epoch_order, _evaluate, default_target_modules, encode
    torch.manual_seed(params["seed"])
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=params["rank"], lora_alpha=params["alpha"],
                                            target_modules=default_target_modules(base), task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params["lr"])
    ex = [encode(tok, Record(prompt=r["prompt"], completion=r["completion"]), params["max_tokens"]) for r in rows]
    pad = tok.pad_token_id or 0
    _evaluate(model, ex, params["batch_size"], pad, "cpu")
    model.train()
    tokens = 0
    for epoch in range(epochs):
        for ids, mask, labels in _batches(ex, _epoch_order(len(ex), params["seed"], epoch), params["batch_size"], pad):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tokens += int(mask.sum())
        _evaluate(model, ex, params["batch_size"], pad, "cpu")
    with tempfile.TemporaryDirectory() as out:     # the tuner publishes its adapter: so does this
        model.save_pretrained(out)
    return time.perf_counter() - t0, tokens


def tuner_job(c, data: bytes, params: dict, epochs: int, name: str) -> float:
    c.call("fs_put", path="bench/data.jsonl", data=data)
    job = c.call("tune_submit", dataset="bench/data.jsonl", params=dict(params, epochs=epochs),
                 val_fraction=0.0, name=name, priority=0)["job"]
    while (st := c.call("tune_status", job=job))["state"] not in ("done", "failed", "cancelled"):
        time.sleep(0.2)
    if st["state"] != "done":
        raise SystemExit(f"tuner job {job} ended {st['state']}: {st['error']}")
    events = c.call("tune_status", job=job, since=0)["events"]
    start = next(e["t"] for e in events if e["event"] == "trial")
    end = next(e["t"] for e in events if e["event"] == "trial_done")
    return end - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_model_args(ap)
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    threads = _common.apply_threads(args)
    path = _common.model_path(args)
    params = dict(PARAMS, batch_size=args.batch_size)
    rows = records(args.records)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    k = _common.KernelProc("--device", "cpu", "--dtype", "float32", "--service", "fs", "--service", "tuner",
                           model=path).start(timeout=600)
    try:
        with k.client() as c:
            while not all(s["state"] == "up" for s in c.svc_list()):       # fs and tuner
                time.sleep(0.2)
            plain, tuned, tokens = [], [], 0
            for i in range(args.repeats):           # interleaved, so drift hits both sides
                secs, tokens = plain_loop(path, rows, params, args.epochs)
                plain.append(secs)
                tuned.append(tuner_job(c, data, params, args.epochs, f"bench-{i}"))
    finally:
        k.stop()
        k.cleanup()
    p, t = _common.med(plain), _common.med(tuned)
    steps = math.ceil(args.records / args.batch_size) * args.epochs
    print(f"model {path} | {args.records} records x {args.epochs} epochs = {steps} steps, "
          f"{tokens} tokens | {threads}")
    print(f"plain peft+torch loop : {tokens / p:10.0f} tokens/s (median of {args.repeats}: {p:.2f}s)")
    print(f"llmos tuner job       : {tokens / t:10.0f} tokens/s (median of {args.repeats}: {t:.2f}s)")
    print(f"ratio tuner/plain     : {p / t:.2f}x  (target >= 0.9x)")


if __name__ == "__main__":
    main()
