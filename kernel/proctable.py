"""The process table: one record (``proc.Process``) per pid, and nothing else keyed by pid.

A record holds everything about its process: owner, state and why it waits, the model it runs
on (``entry``), its I/O (``io``: stream cursors and waiters), its block table and accounting.
Schedulers queue pids over this table; the process manager (``kernel.procmgr``) changes
records; handlers look processes up here, and another user's process is exactly as invisible
as a missing one.
"""
from __future__ import annotations

from llmos.kernel.proc import Process, ProcState
from llmos.syscalls.errors import SyscallError


class ProcTable:
    def __init__(self):
        self.procs: dict[int, Process] = {}
        self.next_pid = 1

    def new_pid(self) -> int:
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        return pid

    def add(self, proc: Process) -> None:
        assert proc.pid not in self.procs, f"pid {proc.pid} in use"
        self.procs[proc.pid] = proc

    def remove(self, pid: int) -> Process:
        return self.procs.pop(pid)

    def get(self, pid: int) -> Process | None:
        return self.procs.get(pid)

    def owned(self, user, pid: int) -> Process:
        """``user``'s process ``pid`` (root may name anyone's); ``ESRCH`` otherwise."""
        proc = self.procs.get(pid)
        if proc is None or (proc.uid != user.uid and not user.is_root):
            raise SyscallError("ESRCH", f"no process {pid}")
        return proc

    def live(self, pid: int, user) -> Process:
        proc = self.owned(user, pid)
        if proc.state is ProcState.ZOMBIE:
            raise SyscallError("ESRCH", f"process {pid} has exited (reap it with wait)")
        return proc

    def all(self) -> list[Process]:
        return sorted(self.procs.values(), key=lambda p: p.pid)

    def visible(self, user, everyone: bool = False) -> list[Process]:
        return [p for p in self.all() if p.uid == user.uid or (user.is_root and everyone)]

    def num_live(self, uid: int) -> int:
        """Live processes of ``uid`` in any state: forks, stopped and waiting ones count."""
        return sum(1 for p in self.procs.values() if p.uid == uid and p.is_alive)

    def of_model(self, entry) -> list[Process]:
        return [p for p in self.procs.values() if p.entry is entry]

    def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.procs.values():
            counts[p.state.name] = counts.get(p.state.name, 0) + 1
        return counts
