"""Training data for the tuner: parse, validate, clean, de-duplicate and split JSONL.

A record is one JSON object per line, in either of two shapes:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "completion": "..."}

``load_jsonl`` refuses the whole file on the first malformed line with a ``DatasetError``
whose message starts ``line N:`` (1-based, blank lines counted, so an editor jumps straight
there). Cleaning never refuses: empty and over-long records are dropped and counted in
``Dataset.report``; exact duplicates (same shape, same text) keep their first occurrence.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from llmos.syscalls.errors import SyscallError

ROLES = ("system", "user", "assistant")


class DatasetError(SyscallError):
    """A refused dataset. ``.errno`` is ``EINVAL``; ``.message`` names the line."""


@dataclass(frozen=True)
class Record:
    """One training example. Exactly one of ``messages`` or (``prompt``, ``completion``) is set.

    ``messages`` is a tuple of ``(role, content)`` pairs, so records hash and compare by value.
    """
    messages: tuple[tuple[str, str], ...] | None = None
    prompt: str | None = None
    completion: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def num_chars(self) -> int:
        if self.is_chat:
            return sum(len(c) for _, c in self.messages)
        return len(self.prompt) + len(self.completion)

    @property
    def is_empty(self) -> bool:
        """Nothing to learn: no completion text, or no non-empty assistant message."""
        if self.is_chat:
            return not any(r == "assistant" and c.strip() for r, c in self.messages)
        return not self.completion.strip()

    def to_json(self) -> dict:
        if self.is_chat:
            return {"messages": [{"role": r, "content": c} for r, c in self.messages]}
        return {"prompt": self.prompt, "completion": self.completion}


@dataclass
class Dataset:
    """Clean records in file order, plus what cleaning did (``report``)."""
    records: list[Record]
    report: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """Seeded shuffle, then cut: ``(train, val)``. Same seed and records -> same split.

        With two or more records, both halves get at least one; with one, val is empty.
        Updates ``report["train"]`` and ``report["val"]``.
        """
        if not 0.0 <= val_fraction < 1.0:
            raise DatasetError("EINVAL", f"val_fraction must be in [0, 1), got {val_fraction!r}")
        order = list(range(len(self.records)))
        random.Random(seed).shuffle(order)
        n = len(order)
        num_val = 0 if n < 2 else min(n - 1, max(1, round(n * val_fraction)))
        val = [self.records[i] for i in sorted(order[:num_val])]
        train = [self.records[i] for i in sorted(order[num_val:])]
        self.report.update(train=len(train), val=len(val))
        return Dataset(train, {"split_of": "train"}), Dataset(val, {"split_of": "val"})

    def to_jsonl(self) -> str:
        return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in self.records)


def _fail(lineno: int, why: str) -> DatasetError:
    return DatasetError("EINVAL", f"line {lineno}: {why}")


def parse_record(obj: object, lineno: int) -> Record:
    """One decoded JSON value -> ``Record``, or a ``DatasetError`` naming ``lineno``."""
    if not isinstance(obj, dict):
        raise _fail(lineno, f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _fail(lineno, "'messages' must be a non-empty list")
        pairs = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise _fail(lineno, f"messages[{i}] must be an object")
            for key in ("role", "content"):
                if key not in m:
                    raise _fail(lineno, f"messages[{i}] is missing '{key}'")
                if not isinstance(m[key], str):
                    raise _fail(lineno, f"messages[{i}].{key} must be a string")
            if m["role"] not in ROLES:
                raise _fail(lineno, f"messages[{i}] has unknown role {m['role']!r} "
                                    f"(expected one of {', '.join(ROLES)})")
            pairs.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in pairs):
            raise _fail(lineno, "'messages' has no assistant message to learn from")
        return Record(messages=tuple(pairs))
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise _fail(lineno, f"missing '{key}'")
            if not isinstance(obj[key], str):
                raise _fail(lineno, f"'{key}' must be a string, got {type(obj[key]).__name__}")
        return Record(prompt=obj["prompt"], completion=obj["completion"])
    raise _fail(lineno, "expected 'messages' or 'prompt' and 'completion'")


def load_jsonl(text: str, max_chars: int | None = None) -> Dataset:
    """Parse, validate and clean a JSONL document (see the module doc).

    ``max_chars`` drops records whose total content is longer; ``None`` keeps all.
    Returns a ``Dataset`` whose ``report`` has read, dropped_empty, dropped_long, duplicates,
    kept (and train/val once ``split`` is called).
    """
    records: list[Record] = []
    seen: set[Record] = set()
    report = dict(read=0, dropped_empty=0, dropped_long=0, duplicates=0, kept=0, train=0, val=0)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
        record = parse_record(obj, lineno)
        report["read"] += 1
        if record.is_empty:
            report["dropped_empty"] += 1
        elif max_chars is not None and record.num_chars > max_chars:
            report["dropped_long"] += 1
        elif record in seen:
            report["duplicates"] += 1
        else:
            seen.add(record)
            records.append(record)
    report["kept"] = len(records)
    return Dataset(records, report)
