"""Text <-> token ids for a model, needing only its tokenizer (no weights).

The kernel tokenizes a spawn's input before the model's weights are on the device (a process
whose model is still loading is already checked and queued); the driver uses the same functions.
"""
from __future__ import annotations

from typing import Any, Sequence


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def apply_chat_template(tokenizer, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a chat ready for the assistant's reply. Uses the tokenizer's template;
    without one, each message renders as ``"<role>: <content>\\n\\n"``, ending with
    ``"assistant: "`` (prefixed by BOS where the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        return [int(i) for i in ids]
    text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: "
    bos = tokenizer.bos_token_id
    body = tokenizer.encode(text, add_special_tokens=False)
    return ([bos] if bos is not None else []) + list(body)
