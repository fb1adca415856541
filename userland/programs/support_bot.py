"""A customer-service bot that answers from the knowledge graph.

Shows: ``kg_add`` to seed facts (products, policies) into your graph; ``spawn(messages=...,
kg=True, interactive=True)`` so the kernel puts the facts about what a question mentions in
front of it; ``pinfo(pid)["kg_facts"]`` to see which facts those were; ``read`` to stream the
answer; ``write`` to continue the same process (and its KV cache) with a follow-up question.

    llmos run userland/programs/support_bot.py --seed
    llmos run userland/programs/support_bot.py --seed "Does the Aero Buds work with the Nimbus X2?"

On the built-in tiny model (random weights) the answers are gibberish; the facts are real.
"""
from __future__ import annotations

import argparse
import sys

from llmos import connect

FACTS = [
    {"entity": "Nimbus X2", "type": "laptop"},
    ["Nimbus X2", "costs", "$999"],
    ["Nimbus X2", "has_warranty_of", "2 years"],
    {"entity": "Aero Buds", "type": "pair of headphones"},
    ["Aero Buds", "costs", "$129"],
    ["Aero Buds", "pairs_with", "Nimbus X2"],
    ["return policy", "allows_returns_within", "30 days"],
    ["return policy", "requires", "the original receipt"],
]
QUESTIONS = ["How much does the Nimbus X2 cost?", "What is your return policy?"]
FOLLOW_UP = "And does that apply to the Aero Buds too?"
SYSTEM = "You are the support assistant of a small electronics shop. Answer from the facts you know."


def show(text: str) -> str:
    """Random weights emit control characters; keep the terminal sane."""
    return "".join(ch if ch.isprintable() else "·" for ch in text)


def stream(c, pid: int) -> str:
    """Print the current turn as it is generated; return it."""
    print("  A: ", end="", flush=True)
    text = ""
    for frame in c.read(pid):
        text += frame.get("text", "")
        print(show(frame.get("text", "")), end="", flush=True)
    print(f"  [{frame.get('finish_reason')}]")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("questions", nargs="*", help=f"default: {QUESTIONS}")
    ap.add_argument("--seed", action="store_true", help="first add the shop's facts to your graph")
    ap.add_argument("--follow-up", default=FOLLOW_UP, help="asked in the same process after each answer")
    ap.add_argument("--max-tokens", type=int, default=24)
    a = ap.parse_args(argv)

    with connect() as c:
        if a.seed:
            added = c.call("kg_add", triples=FACTS, source="support_bot")["added"]
            print(f"seeded the knowledge graph: {added} new of {len(FACTS)} facts")
        for question in a.questions or QUESTIONS:
            print(f"\nQ: {question}")
            pid = c.spawn(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                          kg=True, interactive=True, max_tokens=a.max_tokens)
            facts = c.pinfo(pid)["kg_facts"]
            print(f"  pid {pid}; {len(facts)} facts put in front" + (":" if facts else " (try --seed)"))
            for fact in facts:
                print(f"    - {fact}")
            stream(c, pid)
            # The process is BLOCKED with its KV cache: the follow-up continues the conversation.
            print(f"  Q: {a.follow_up}")
            c.write(pid, messages=[{"role": "user", "content": a.follow_up}])
            stream(c, pid)
            usage = c.wait(pid)["usage"]
            print(f"  ({usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} generated "
                  f"over both turns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
