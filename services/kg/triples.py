"""What a fact looks like on the way in: validation and normalisation of triples and patterns.

Every name that reaches the graph passed through here, so the rest of the package may assume:
names are non-empty, stripped, at most ``MAX_NAME_CHARS``, free of control characters and do
not start with ``?`` (that prefix marks a query variable); relations likewise; properties are a
small JSON object. Entities are identified by ``entity_key`` (whitespace-collapsed, casefolded),
so "ACME  corp" and "Acme Corp" are one entity whose display name is the first spelling seen.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field

from llmos.services.kg.errors import KgError

MAX_NAME_CHARS = 256
MAX_RELATION_CHARS = 128
MAX_TYPE_CHARS = 64
MAX_SOURCE_CHARS = 256
MAX_PROPS_BYTES = 4096
MAX_BATCH = 10_000
MAX_PATTERNS = 16

_VARIABLE = re.compile(r"\?[A-Za-z_][A-Za-z0-9_]*\Z")


def entity_key(name: str) -> str:
    """The identity of an entity or relation name: case- and spacing-insensitive."""
    return " ".join(name.split()).casefold()


@dataclass(frozen=True)
class Triple:
    """A validated fact, with display spellings; keys derive from them."""

    s: str
    r: str
    o: str
    props: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"s": self.s, "r": self.r, "o": self.o, "props": self.props}


@dataclass(frozen=True)
class Entity:
    """A validated entity record: sets type and merges properties (creating it if new)."""

    name: str
    type: str | None = None
    props: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"entity": self.name, "type": self.type, "props": self.props}


def check_name(value: object, what: str, max_chars: int = MAX_NAME_CHARS) -> str:
    """Return ``value`` stripped, or raise EINVAL saying what is wrong with it."""
    if not isinstance(value, str):
        raise KgError("EINVAL", f"{what} must be a string, not {type(value).__name__}")
    text = value.strip()
    if not text:
        raise KgError("EINVAL", f"{what} is empty")
    if len(text) > max_chars:
        raise KgError("EINVAL", f"{what} is {len(text)} characters; the limit is {max_chars}")
    if text.startswith("?"):
        raise KgError("EINVAL", f"{what} {text!r} starts with '?', which marks a query variable")
    if any(unicodedata.category(ch) == "Cc" for ch in text):
        raise KgError("EINVAL", f"{what} {text[:40]!r} contains control characters")
    return text


def check_props(value: object, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise KgError("EINVAL", f"{what} must be an object with string keys")
    try:
        size = len(json.dumps(value, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise KgError("EINVAL", f"{what} is not plain JSON: {exc}") from None
    if size > MAX_PROPS_BYTES:
        raise KgError("EINVAL", f"{what} is {size} bytes of JSON; the limit is {MAX_PROPS_BYTES}")
    return dict(value)


def check_source(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_SOURCE_CHARS:
        raise KgError("EINVAL", f"source must be a string of at most {MAX_SOURCE_CHARS} characters")
    return value


def parse_item(item: object, where: str = "item") -> Triple | Entity:
    """One element of an ``add`` batch: a triple, ``{s, r, o[, props]}`` or ``{entity[, type, props]}``."""
    if isinstance(item, (tuple, list)) and len(item) == 3:
        s, r, o = item
        props = None
    elif isinstance(item, dict) and "entity" in item:
        name = check_name(item["entity"], f"{where}: entity")
        type_ = item.get("type")
        if type_ is not None:
            type_ = check_name(type_, f"{where}: type", MAX_TYPE_CHARS)
        return Entity(name, type_, check_props(item.get("props"), f"{where}: props"))
    elif isinstance(item, dict) and {"s", "r", "o"} <= item.keys():
        s, r, o, props = item["s"], item["r"], item["o"], item.get("props")
    else:
        raise KgError("EINVAL", f"{where}: expected (subject, relation, object), "
                                "{s, r, o[, props]} or {entity[, type, props]}")
    return Triple(check_name(s, f"{where}: subject"),
                  check_name(r, f"{where}: relation", MAX_RELATION_CHARS),
                  check_name(o, f"{where}: object"),
                  check_props(props, f"{where}: props"))


def parse_batch(items: object) -> list[Triple | Entity]:
    """Validate a whole batch before anything is written: one bad item refuses all of it."""
    if isinstance(items, (tuple, dict)) or (isinstance(items, list) and items and isinstance(items[0], str)):
        items = [items]  # a lone triple is a batch of one
    if not isinstance(items, list):
        raise KgError("EINVAL", "triples must be a list")
    if len(items) > MAX_BATCH:
        raise KgError("EINVAL", f"{len(items)} items in one batch; the limit is {MAX_BATCH}")
    return [parse_item(item, f"item {i}") for i, item in enumerate(items)]


# -- patterns -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """A pattern position: a variable (``?x``) or a constant compared by ``entity_key``."""

    text: str
    is_var: bool

    @property
    def key(self) -> str:
        return self.text if self.is_var else entity_key(self.text)


def _parse_term(value: object, what: str) -> Term:
    if isinstance(value, str) and value.startswith("?"):
        if not _VARIABLE.match(value):
            raise KgError("EINVAL", f"{what}: bad variable {value!r} (use ?name, letters, digits, _)")
        return Term(value, True)
    return Term(check_name(value, what), False)


def parse_pattern(pattern: object) -> list[tuple[Term, Term, Term]]:
    """A triple pattern or a conjunctive list of them, as ``(s, r, o)`` terms."""
    if isinstance(pattern, dict) or (isinstance(pattern, (list, tuple)) and pattern
                                     and isinstance(pattern[0], str)):
        pattern = [pattern]
    if not isinstance(pattern, (list, tuple)) or not pattern:
        raise KgError("EINVAL", "pattern must be a triple or a non-empty list of triples")
    if len(pattern) > MAX_PATTERNS:
        raise KgError("EINVAL", f"{len(pattern)} triples in one pattern; the limit is {MAX_PATTERNS}")
    parsed = []
    for i, part in enumerate(pattern):
        if isinstance(part, dict) and {"s", "r", "o"} <= part.keys():
            part = (part["s"], part["r"], part["o"])
        if not isinstance(part, (list, tuple)) or len(part) != 3:
            raise KgError("EINVAL", f"pattern {i}: expected (subject, relation, object)")
        parsed.append(tuple(_parse_term(v, f"pattern {i} {pos}")
                            for v, pos in zip(part, ("subject", "relation", "object"))))
    return parsed
