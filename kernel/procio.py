"""A process's I/O side: the text of its current turn, stop strings, and who is listening.

The scheduler deals in token ids; this is where ids become text for readers, incrementally:
each token decodes a window of a few tokens before it (as vLLM's detokenizer does), so a turn
costs linear time, not quadratic, and a window that disagrees with what came before falls back
to decoding the whole turn. Stop strings are matched on the decoded text; the kernel ends the turn when one appears and the text is
cut before it. Streamed text holds back a possible partial stop string and an incomplete
UTF-8 character, so readers never see text that is later taken back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable


PENDING_REPLY = object()     # returned by a handler that will reply later (wait, read)


class WaitKind(Enum):
    READ = "read"                 # a streaming read: frames until the turn ends
    WAIT = "wait"                 # a wait: one answer when the process ends (it is reaped)


@dataclass
class Waiter:
    """A pending ``read`` (stream) or ``wait`` call, answered by the process manager."""
    kind: WaitKind
    call: Any                     # the kernel's Call (identity, rid, user, ...)
    deadline: float | None = None
    seen_ids: int = 0             # a read: the turn's ids and characters its caller already has
    seen_chars: int = 0

    def unseen(self, chunk: dict, at_ids: int, at_chars: int) -> dict:
        """The part of ``chunk`` (which starts at id ``at_ids``, character ``at_chars`` of the
        turn) this reader has not seen: a resumed read (``since``) never sees a token twice."""
        ids, text = chunk["token_ids"], chunk["text"]
        return {**chunk, "token_ids": ids[max(0, self.seen_ids - at_ids):],
                "text": text[max(0, self.seen_chars - at_chars):]}


@dataclass
class ProcIO:
    decode: Callable[[list[int]], str]
    stop: tuple[str, ...] = ()
    turn_ids: list[int] = field(default_factory=list)   # output ids of the current turn
    text: str = ""                                      # decoded, stop-string-cut text of the turn
    num_streamed_chars: int = 0
    num_streamed_ids: int = 0
    finish_reason: str | None = None                    # of the last finished turn
    turn_done: bool = False
    close_after_turn: bool = False                      # wait() on an interactive process
    events: list[dict] = field(default_factory=list)    # preemption notices etc.
    kg_facts: list[str] = field(default_factory=list)   # knowledge-graph facts put before the prompt
    turn_started_at: float = field(default_factory=time.monotonic)   # for time to first token
    last_token_at: float | None = None
    waiters: list[Waiter] = field(default_factory=list)
    # incremental decoding: turn_ids[:read] decode to ``decoded``; [prefix:read] is the context
    decoded: str = ""
    prefix: int = 0
    read: int = 0

    def new_turn(self) -> None:
        self.turn_ids, self.text, self.decoded, self.prefix, self.read = [], "", "", 0, 0
        self.num_streamed_chars = self.num_streamed_ids = 0
        self.turn_done, self.finish_reason = False, None
        self.turn_started_at, self.last_token_at = time.monotonic(), None

    def append(self, token_id: int) -> bool:
        """Add one generated token. Returns True if a stop string now ends the turn."""
        self.turn_ids.append(token_id)
        text = self._decode_new()
        for s in self.stop:
            i = text.find(s, max(0, len(self.text) - len(s)))
            if i >= 0:
                self.text = text[:i]
                return True
        self.text = text
        return False

    def _decode_new(self, final: bool = False) -> str:
        """The turn's text so far. A trailing incomplete character waits for its next token
        unless ``final``."""
        ids, p, r = self.turn_ids, self.prefix, self.read
        before = self.decode(ids[p:r]) if r > p else ""
        window = self.decode(ids[p:])
        if not window.startswith(before):                 # the window disagrees: decode it all
            self.decoded = self.decode(ids)
            self.prefix, self.read = max(0, len(ids) - 4), len(ids)
        elif len(window) > len(before) and (final or not window.endswith("\ufffd")):
            self.decoded += window[len(before):]
            self.prefix, self.read = r, len(ids)
        return self.decoded

    def finish(self) -> None:
        """The turn ended: take its last tokens' text even if it ends mid-character (unless a
        stop string already cut the text)."""
        if self.read < len(self.turn_ids) and len(self.text) == len(self.decoded):
            self.text = self._decode_new(final=True)

    def pending_chunk(self, final: bool) -> dict | None:
        """What readers have not seen yet; while the turn runs, hold back what may change."""
        if final:
            self.finish()
        end = len(self.text)
        if not final:
            hold = max((len(s) - 1 for s in self.stop), default=0)
            end = max(self.num_streamed_chars, end - hold)
            while end > self.num_streamed_chars and self.text[end - 1] == "\ufffd":
                end -= 1       # an incomplete multi-byte character: wait for its next token
        text = self.text[self.num_streamed_chars:end]
        ids = self.turn_ids[self.num_streamed_ids:]
        if not text and not ids and not final:
            return None
        self.num_streamed_chars = end
        self.num_streamed_ids = len(self.turn_ids)
        return {"text": text, "token_ids": ids}

    def result(self, pid: int, proc) -> dict:
        return {"pid": pid, "text": self.text, "token_ids": list(self.turn_ids),
                "finish_reason": self.finish_reason, "events": list(self.events),
                "usage": {"prompt_tokens": proc.tokens_in, "completion_tokens": proc.tokens_out,
                          "cached_tokens": proc.num_cached_tokens},
                "accounting": {"preemptions": proc.num_preemptions, "swaps": proc.num_swaps,
                               "recomputes": proc.num_recomputes}}

    def expired(self, now: float | None = None) -> list[Waiter]:
        now = time.monotonic() if now is None else now
        gone = [w for w in self.waiters if w.deadline is not None and w.deadline <= now]
        self.waiters = [w for w in self.waiters if w not in gone]
        return gone
