"""A batch sentiment monitor next to an interactive chat: priorities keep the chat responsive.

Shows: many low-priority processes (``priority`` 10..19, one per review) classifying text,
while a high-priority interactive chat (``priority=-10``) runs alongside: a thread (with its
own connection: one client per thread) streams it with ``read``. The monitor polls ``ps`` for
when each batch process finishes, and compares the kernel's own time-to-first-token figures per
priority (``stat``). Under contention the scheduler runs the chat first: its first token comes
in a step or two while the batch waits its turn.

    llmos run userland/programs/sentiment_monitor.py --reviews 24
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

from llmos import connect

REVIEWS = ["Great battery life, I love it.", "Broke after two days.", "Does what it says.",
           "The screen is gorgeous.", "Support never answered my emails.", "Fast shipping, nice box.",
           "Too loud and too hot.", "Best purchase this year.", "Arrived scratched.", "Solid value for money.",
           "The app keeps crashing.", "My kids use it every day."]


def chat(question: str, max_tokens: int, out: dict) -> None:
    """Stream one interactive turn at nice -10; note when its first token came."""
    with connect() as c:
        t0 = time.monotonic()
        pid = c.spawn(messages=[{"role": "user", "content": question}], priority=-10, interactive=True,
                      max_tokens=max_tokens)
        for frame in c.read(pid):
            if frame.get("token_ids") and "first" not in out:
                out["first"], out["ttft"] = time.monotonic(), time.monotonic() - t0
        out["text"] = c.wait(pid)["text"]


def mean_ttft(before: dict, after: dict, nices) -> float:
    """The kernel's own time-to-first-token figures (spawn to first token) for these nice values."""
    rows = [(after.get(str(n), {}), before.get(str(n), {})) for n in nices]
    total = sum(a.get("sum", 0) - b.get("sum", 0) for a, b in rows)
    count = sum(a.get("count", 0) - b.get("count", 0) for a, b in rows)
    return total / count if count else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reviews", type=int, default=24, help="batch size (reviews cycle through a built-in list)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per classification")
    ap.add_argument("--question", default="Hi! Is my order on its way?")
    a = ap.parse_args(argv)

    with connect() as c:
        before = c.stat()["latency"]["ttft"]
        t0 = time.monotonic()
        batch = {}
        for i in range(a.reviews):
            review = REVIEWS[i % len(REVIEWS)]
            pid = c.spawn(prompt=f"Review: {review}\nSentiment (positive or negative):", max_tokens=a.max_tokens,
                          priority=10 + i % 10, ignore_eos=True)
            batch[pid] = {"review": review, "nice": 10 + i % 10}
        print(f"spawned {len(batch)} batch classifiers at nice 10..19 in {time.monotonic() - t0:.2f}s; "
              f"now a chat at nice -10")
        out: dict = {}
        talker = threading.Thread(target=chat, args=(a.question, a.max_tokens, out))
        talker.start()
        while any("done" not in b for b in batch.values()):            # the monitor: poll ps
            now = time.monotonic()
            for row in c.ps():
                if row["pid"] in batch and row["state"] == "ZOMBIE":
                    batch[row["pid"]].setdefault("done", now)
            time.sleep(0.01)
        talker.join()
        for pid, b in batch.items():
            b["label"] = c.wait(pid)["text"]
        after = c.stat()["latency"]["ttft"]

    print(f"\n{'pid':>4} {'nice':>4} {'done':>6}  review -> label (the model's words)")
    for pid, b in batch.items():
        print(f"{pid:>4} {b['nice']:>4} {b['done'] - t0:>5.2f}s  {b['review']} -> {b['label'].strip()[:24]!r}")
    before_chat = sum(b["done"] < out["first"] for b in batch.values())
    print(f"\ntime to first token, spawn to first token (the kernel's figures from stat): "
          f"chat (nice -10) {mean_ttft(before, after, [-10]):.3f}s, "
          f"batch (nice 10..19) {mean_ttft(before, after, range(10, 20)):.3f}s on average")
    print(f"the chat's first token reached this program {out['ttft']:.3f}s after it called spawn; "
          f"answer {out['text'][:32]!r}")
    print(f"batch processes finished before the chat's first token: {before_chat} of {len(batch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
