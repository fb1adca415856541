"""A feedback-and-tune loop: rate answers, correct them, fine-tune, and get the corrections back.

Shows: ``feedback(pid, rating, correction)`` on a finished process (before ``wait`` reaps it)
appends the prompt, the answer and the correction to ``feedback.jsonl`` in your file store;
``tune_submit(dataset="feedback", ...)`` queues a LoRA fine-tuning job on those records;
``tune_status`` reports its progress; the adapter lands in ``adapters/<name>`` in your file
store, and ``spawn(adapter="adapters/<name>")`` answers with it (greedy, same prompts).

    llmos run userland/programs/feedback_tune.py --name support-lora

The defaults teach the built-in tiny model four answers in about half a minute on two cores.
Exit code 0 when every tuned answer equals its correction, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time

from llmos import connect

CORRECTIONS = [("What is the capital of France?", " Paris"),
               ("What color is the sky?", " blue"),
               ("Who wrote Hamlet?", " Shakespeare"),
               ("Where is the kernel?", " in memory")]
PARAMS = dict(rank=8, alpha=16, lr=1e-2, epochs=40, batch_size=8, seed=0,
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def answer(c, prompt: str, max_tokens: int, adapter: str | None = None) -> tuple[int, str]:
    """Run a prompt to the end; the process stays a ZOMBIE (not reaped) so it can be rated."""
    pid = c.spawn(prompt=prompt, max_tokens=max_tokens, adapter=adapter)
    return pid, "".join(frame.get("text", "") for frame in c.read(pid))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="feedback-demo", help="the adapter lands in adapters/NAME")
    ap.add_argument("--epochs", type=int, default=PARAMS["epochs"])
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args(argv)

    with connect() as c:
        print("1. answers, rated bad and corrected with feedback():")
        for prompt, correction in CORRECTIONS:
            pid, text = answer(c, prompt, a.max_tokens)
            rec = c.feedback(pid=pid, rating=-1, correction=correction)
            c.wait(pid)
            print(f"   {prompt} -> {text.strip()[:24]!r}; correction {correction.strip()!r} "
                  f"({rec['path']}: {rec['records']} records)")

        job = c.call("tune_submit", dataset="feedback", params=dict(PARAMS, epochs=a.epochs),
                     val_fraction=0.0, name=a.name)
        print(f"\n2. tune_submit: job {job['job']} on {job['num_train']} records -> {job['adapter']}")
        last = None
        while True:
            st = c.call("tune_status", job=job["job"])
            if last is None or st["state"] != last["state"] or st["step"] >= last["step"] + 10:
                loss = f", loss {st['loss']:.3f}" if st["loss"] is not None else ""
                print(f"   {st['state']}: step {st['step']}/{st['total_steps']}{loss}", flush=True)
                last = st
            if st["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(0.2)
        if st["state"] != "done":
            print(f"   the job ended {st['state']}: {st.get('error') or st.get('message')}")
            return 1

        print(f"\n3. the same prompts with adapter={job['adapter']!r}:")
        learned = 0
        for prompt, correction in CORRECTIONS:
            pid, text = answer(c, prompt, a.max_tokens, adapter=job["adapter"])
            c.wait(pid)
            learned += text == correction
            print(f"   {'ok' if text == correction else 'NO'}  {prompt} -> {text!r}")
        print(f"\n{learned} of {len(CORRECTIONS)} tuned answers equal their corrections")
    return 0 if learned == len(CORRECTIONS) else 1


if __name__ == "__main__":
    sys.exit(main())
