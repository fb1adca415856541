"""The process control block.

A process is one generation stream. Its fields are grouped by who may change them:
identity is fixed at spawn; the syscall layer sets the knobs; the scheduler owns state,
token history and the block table; accounting only ever grows. ``io`` belongs to the
kernel's syscall layer (waiters, stream cursors) and the scheduler never touches it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from llmos.drivers.batch import SamplingParams

NICE_MIN, NICE_MAX = -20, 19


class ProcState(Enum):
    READY = "ready"          # runnable, not in the last step's batch (may still hold KV)
    RUNNING = "running"      # in the last step's batch; holds its KV on the device
    BLOCKED = "blocked"      # interactive, turn finished, awaiting input (keeps its KV)
    STOPPED = "stopped"      # not scheduled until cont; its KV is the first taken
    SWAPPED = "swapped"      # runnable, KV in host memory
    ZOMBIE = "zombie"        # finished, KV freed, waiting to be reaped


RUNNABLE = frozenset({ProcState.READY, ProcState.RUNNING, ProcState.SWAPPED})


@dataclass(eq=False)
class Process:
    # --- identity (fixed at spawn) ---
    pid: int
    ppid: int = 0
    uid: int = 0
    model: str = ""
    created_at: float = field(default_factory=time.time)

    # --- set by syscalls ---
    nice: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256                       # per turn
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    interactive: bool = False
    adapter: str | None = None                  # LoRA adapter name, None for the base model

    # --- owned by the scheduler ---
    token_ids: list[int] = field(default_factory=list)   # prompt + every output so far
    state: ProcState = ProcState.READY
    num_prompt_tokens: int = -1                 # -1: taken from token_ids at creation
    num_computed_tokens: int = 0                # tokens whose KV is in the cache
    turn_start: int = -1                        # index of this turn's first output token
    block_ids: list[int] = field(default_factory=list)       # device block table
    host_block_ids: list[int] = field(default_factory=list)  # while swapped out
    finish_reason: str | None = None
    stopped_from: ProcState | None = None       # state to return to on cont
    age: int = 0                                # steps runnable but not scheduled
    arrival: int = 0                            # admission sequence number (tie-break)
    resume_pending: bool = False                # preempted; "resumed" when scheduled again

    # --- accounting ---
    tokens_in: int = 0
    tokens_out: int = 0
    num_preemptions: int = 0
    num_swaps: int = 0
    num_recomputes: int = 0
    num_cached_tokens: int = 0                  # prefill skipped thanks to the prefix cache
    time_queued: float = 0.0
    time_running: float = 0.0
    first_token_at: float | None = None

    # --- reserved for the kernel's syscall layer ---
    io: object | None = None

    def __post_init__(self):
        if not NICE_MIN <= self.nice <= NICE_MAX:
            raise ValueError(f"nice must be in [{NICE_MIN}, {NICE_MAX}], got {self.nice}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.stop_token_ids = frozenset(self.stop_token_ids)
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)
        if self.turn_start < 0:
            self.turn_start = len(self.token_ids)
        if not self.tokens_in:
            self.tokens_in = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated in the current turn."""
        return len(self.token_ids) - self.turn_start

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """This turn's output so far."""
        return self.token_ids[self.turn_start:]

    @property
    def is_alive(self) -> bool:
        return self.state is not ProcState.ZOMBIE

    @property
    def is_runnable(self) -> bool:
        return self.state in RUNNABLE
