"""The process control block.

A process is one generation stream, and this is its one record: the kernel's process table
(``kernel.proctable``) maps each pid to one ``Process``. Its fields are grouped by who may
change them: identity is fixed at spawn; the syscall layer sets the knobs; the state machine
(``stop``/``cont`` here, the scheduler while it runs) owns state, token history and the block
table; accounting only ever grows. ``io`` (waiters, stream cursors) and ``entry`` (the model)
belong to the kernel's process manager, and the scheduler never touches them.

A BLOCKED process says why in ``wait``: ``Wait.INPUT`` (an interactive process between turns)
or ``Wait.MODEL`` (its model is not on the device: a page fault, like xv6 sleeping on a channel).
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


class Wait(Enum):
    """Why a BLOCKED process waits."""
    INPUT = "input"          # interactive, turn finished: ``write`` continues it
    MODEL = "model"          # its model is loading or waiting for room on the device


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
    session: str | None = None                  # the client session that spawned it (HUP)
    hup: bool = False                           # ends on HUP even if not interactive

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
    wait: Wait | None = None                    # why it is (or, stopped, was) BLOCKED
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
    time_running: float = 0.0                   # seconds in steps that computed it
    first_token_at: float | None = None
    ended_at: float | None = None               # wall time it became a ZOMBIE (its reap TTL)

    # --- the kernel's process manager (never the scheduler) ---
    io: object | None = None                    # ProcIO: text, stop strings, waiters
    entry: object | None = None                 # its model's ModelEntry

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

    # --- the state machine's signal half (the scheduler's half runs the batch) ---
    def stop(self) -> None:
        """STOP: not scheduled until ``cont``; its KV is the first taken under pressure."""
        if self.state is ProcState.STOPPED:
            return
        self.stopped_from = ProcState.READY if self.state is ProcState.RUNNING else self.state
        self.state = ProcState.STOPPED

    def cont(self) -> None:
        """CONT: back to the state it was stopped in (a no-op unless STOPPED)."""
        if self.state is ProcState.STOPPED:
            self.state, self.stopped_from = self.stopped_from, None

    def block(self, wait: Wait) -> None:
        """Wait for ``wait``; a STOPPED process will wait for it once continued."""
        if self.state is ProcState.STOPPED:
            self.stopped_from = ProcState.BLOCKED
        else:
            self.state = ProcState.BLOCKED
        self.wait = wait

    def wake(self) -> None:
        """What it waited for is here: BLOCKED on it becomes READY (STOPPED: READY on cont)."""
        self.wait = None
        if self.state is ProcState.BLOCKED:
            self.state = ProcState.READY
        elif self.state is ProcState.STOPPED and self.stopped_from is ProcState.BLOCKED:
            self.stopped_from = ProcState.READY

    def exit(self, reason: str) -> None:
        """Become a ZOMBIE (the block manager must have freed its KV first)."""
        assert not self.block_ids and not self.host_block_ids, f"pid {self.pid} exits holding KV"
        self.state, self.finish_reason, self.stopped_from, self.wait = ProcState.ZOMBIE, reason, None, None
        self.ended_at = time.time()

    def append_turn(self, token_ids: list[int]) -> None:
        """Input for a new turn: its output starts after these tokens."""
        self.token_ids.extend(token_ids)
        self.tokens_in += len(token_ids)
        self.turn_start, self.finish_reason = self.num_tokens, None

    @property
    def waits_for_input(self) -> bool:
        return self.wait is Wait.INPUT and self.state is ProcState.BLOCKED

    @property
    def waits_for_model(self) -> bool:
        return self.wait is Wait.MODEL and self.is_alive
