"""Sessions: a client connection's life, and what ends with it (HUP), and zombies nobody reaps.

A client names its session in every request's envelope (a random string it picks) and sends a
heartbeat (``nop``) every third of ``timeout`` while it lives; ``bye`` ends a session cleanly.
A session not heard from for ``timeout`` seconds ended without a goodbye: its processes get
**HUP** — interactive ones and those spawned with ``hup=True`` (the HTTP gateway's default)
end (finish reason ``hup``) and are reaped; the others run on, as under ``nohup``. Sessions are
per user: another user's calls never keep a session alive or end it.

A ZOMBIE nobody waits for is reaped ``zombie_ttl`` seconds after it ended (``pinfo``'s
``reap_in_s``). After a restart the sessions of restored processes start their ``timeout``
afresh: a client that is still there heartbeats the new kernel in time.
"""
from __future__ import annotations

import time

from llmos.kernel.procio import WaitKind

CHECK_EVERY = 0.5            # seconds between looks at the sessions and the zombies


class Sessions:
    def __init__(self, timeout: float = 15.0, zombie_ttl: float = 3600.0):
        self.timeout = timeout
        self.zombie_ttl = zombie_ttl
        self.last_seen: dict[tuple[int, str], float] = {}    # (uid, session) -> monotonic time
        self._next_check = 0.0

    def touch(self, uid: int, session: str | None) -> None:
        if session is not None:
            self.last_seen[(uid, session)] = time.monotonic()

    def bye(self, uid: int, session: str | None) -> bool:
        """A clean end: its processes are not hung up."""
        return self.last_seen.pop((uid, session), None) is not None

    def adopt(self, procs) -> None:
        """After a restart: the restored processes' sessions start their timeout now."""
        for p in procs:
            if p.session is not None and p.is_alive:
                self.touch(p.uid, p.session)

    def tick(self, procmgr) -> None:
        """Hang up the processes of sessions that ended; reap zombies past their TTL."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_EVERY
        gone = {key for key, seen in self.last_seen.items() if now - seen > self.timeout}
        for key in gone:
            del self.last_seen[key]
        table = procmgr.table
        for proc in list(table.procs.values()):
            if proc.session is None:
                continue
            if (proc.uid, proc.session) in gone:
                proc.session = None                      # hung up once; what runs on is nohup'd
                if proc.is_alive and (proc.interactive or proc.hup):
                    procmgr.terminate(proc, "hup")
                    if not any(w.kind is WaitKind.WAIT for w in proc.io.waiters) and not proc.is_alive:
                        procmgr.reap(proc)
        wall = time.time()
        for proc in [p for p in table.procs.values() if not p.is_alive and p.ended_at is not None]:
            if wall - proc.ended_at > self.zombie_ttl and not proc.io.waiters:
                procmgr.reap(proc)

    def reap_in(self, proc) -> float | None:
        """Seconds until ``proc``, a zombie, is reaped unless someone waits for it."""
        if proc.is_alive or proc.ended_at is None:
            return None
        return max(0.0, round(self.zombie_ttl - (time.time() - proc.ended_at), 1))
