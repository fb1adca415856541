"""A spawn's or write's input as token ids: raw text, chat messages (the model's chat template)
or ids, and the context window they must fit."""
from __future__ import annotations

from llmos.drivers import text
from llmos.syscalls.errors import SyscallError


def context_len(entry) -> int:
    if entry.engine is not None:
        return entry.engine.max_model_len
    from llmos.drivers.model import limits
    return limits(entry.config)[0]


def vocab_size(entry) -> int:
    return entry.config.get_text_config().vocab_size


def check_ids(name: str, ids: list, vocab: int) -> list[int]:
    if not all(0 <= t < vocab for t in ids):
        raise SyscallError("EINVAL", f"{name} must be token ids in [0, {vocab})")
    return list(ids)


def tokens_for(entry, args: dict, prompt_key: str = "prompt", ids_key: str = "prompt_ids") -> list[int]:
    """Exactly one of ``prompt_key`` (text), ``messages`` or ``ids_key``, as token ids (the
    table has checked their types)."""
    given = [k for k in (prompt_key, "messages", ids_key) if args.get(k) is not None]
    if len(given) != 1:
        raise SyscallError("EINVAL", f"give exactly one of {prompt_key}, messages, {ids_key}")
    tok = entry.tokenizer
    if given[0] == prompt_key:
        ids = text.encode(tok, args[prompt_key])
    elif given[0] == "messages":
        ids = text.apply_chat_template(tok, args["messages"])
    else:
        ids = check_ids(ids_key, args[ids_key], vocab_size(entry))
    if not ids:
        raise SyscallError("EINVAL", "empty input")
    return list(ids)
