"""The gateway's pool of ABI clients: one per (token, thread at a time)."""
from __future__ import annotations

import threading
from contextlib import contextmanager

from llmos.syscalls.client import Client
from llmos.syscalls.errors import SyscallError
from llmos.userland.gateway_request import TRANSPORT_ERRNOS


class ClientPool:
    """Idle ABI clients per token. A Client is not thread-safe, so each is lent to one thread
    at a time and given back after the call; one that saw a transport error is closed."""

    def __init__(self, socket: str, timeout: float = 30.0):
        self.socket, self.timeout = socket, timeout
        self._idle: dict[str, list[Client]] = {}
        self.known_tokens: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def client(self, token: str):
        with self._lock:
            idle = self._idle.get(token)
            c = idle.pop() if idle else None
        c = c or Client(self.socket, token, timeout=self.timeout)
        try:
            yield c
        except SyscallError as err:
            self._release(token, c, keep=err.errno not in TRANSPORT_ERRNOS)
            raise
        except BaseException:
            self._release(token, c, keep=False)
            raise
        self._release(token, c, keep=True)

    def _release(self, token: str, c: Client, keep: bool) -> None:
        if keep:
            with self._lock:
                self._idle.setdefault(token, []).append(c)
        else:
            c.close()

    def check(self, token: str) -> None:
        """Raises EACCES unless the kernel knows ``token``; known tokens are remembered."""
        if token not in self.known_tokens:
            self.whoami(token)

    def whoami(self, token: str) -> dict:
        """The kernel's ``whoami`` for ``token`` ({user, uid, caps}); the token is known from then
        on. An unknown token raises EACCES and keeps no client open (each would hold a socket)."""
        try:
            with self.client(token) as c:
                me = c.whoami()
        except SyscallError as err:
            if err.errno == "EACCES":
                with self._lock:
                    for c in self._idle.pop(token, []):
                        c.close()
            raise
        with self._lock:
            self.known_tokens.add(token)
        return me

    def num_idle(self) -> int:
        """Clients kept open for reuse, all tokens together."""
        with self._lock:
            return sum(len(clients) for clients in self._idle.values())

    def close(self) -> None:
        with self._lock:
            for clients in self._idle.values():
                for c in clients:
                    c.close()
            self._idle.clear()
