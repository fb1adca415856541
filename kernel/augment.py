"""Knowledge-graph augmentation of a spawn: ``spawn(..., kg=True | "graph")``.

The kernel asks the ``kg`` service, on the caller's behalf (so only graphs the caller may read
are used), for the facts about the entities the prompt mentions within ``kg_budget`` tokens,
puts them before the prompt (or in a system message for chat input), then spawns as usual.
The spawn's reply waits for the facts; ``pinfo`` lists the facts that were added.
"""
from __future__ import annotations

from llmos.kernel.procio import PENDING_REPLY
from llmos.kernel.services import answer_later
from llmos.syscalls.errors import SyscallError

HEADER = "Facts you know:\n"


def spawn_with_facts(k, call, spawn, a: dict) -> object:
    kg = a["kg"]
    if not (kg is True or (isinstance(kg, str) and 0 < len(kg) <= 64)):
        raise SyscallError("EINVAL", "kg must be true or the name of a graph (mine, shared, all)")
    if a["prompt"] is not None:
        text = a["prompt"]
    elif a["messages"]:
        text = "\n".join(m.get("content", "") for m in a["messages"] if isinstance(m, dict)
                         and isinstance(m.get("content"), str))
    else:
        raise SyscallError("EINVAL", "kg augmentation needs a prompt or messages, not prompt_ids")

    def spawn_with(result):
        facts = [f for f in result if isinstance(f, str)]
        return spawn(k, call, with_facts(a, facts), facts)

    k.services.ask("kg_facts", {"text": text, "max_tokens": a["kg_budget"],
                                "graph": "all" if kg is True else kg}, call.user,
                   answer_later(k, call, spawn_with))
    return PENDING_REPLY


def with_facts(args: dict, facts: list[str]) -> dict:
    """The spawn's arguments with the facts put before the input."""
    if not facts:
        return args
    block = HEADER + "".join(f"- {f}\n" for f in facts)
    if args["prompt"] is not None:
        return {**args, "prompt": block + "\n" + args["prompt"]}
    return {**args, "messages": [{"role": "system", "content": block}, *args["messages"]]}
