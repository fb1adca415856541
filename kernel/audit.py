"""The audit trail: every security-relevant event as one JSON line in ``<state>/audit/audit.log``.

Events: ``auth_failed`` (a bad token), ``handshake_failed`` (a refused CURVE handshake),
``key_refused`` (a client key not registered for the token's user), ``cap_refused``,
``user_add`` / ``user_token`` / ``user_set`` / ``user_key_add`` / ``user_key_rm``,
``signal_other`` (root signalling another user's process), ``model_load``, ``adapter_load``,
``quota_refused``, ``service_restart``, ``service_attach``, ``users_sync``. Each line has ``time`` (Unix seconds), ``event``,
``user`` (a name, where one is known) and the event's own fields — never a token, a secret key
or a prompt. The file is 0600 and rotated by size (the standard library's
``RotatingFileHandler``); root reads it with the ``audit`` syscall (``llmos audit``).

One trail per kernel process: ``open`` at boot; before that (unit tests) ``event`` does nothing.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from pathlib import Path

MAX_BYTES = 8 << 20          # per file, before it rotates
BACKUPS = 4                  # rotated files kept (audit.log.1 .. .4)
_log = logging.getLogger("llmos.audit")
_log.propagate = False
_path: Path | None = None


class _PrivateHandler(logging.handlers.RotatingFileHandler):
    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")


def open(state: Path) -> None:       # noqa: A001 - the trail's own verb
    global _path
    d = state / "audit"
    d.mkdir(mode=0o700, exist_ok=True)
    _path = d / "audit.log"
    for h in list(_log.handlers):
        _log.removeHandler(h)
        h.close()
    handler = _PrivateHandler(_path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)


def event(kind: str, user: str | None = None, **fields) -> None:
    """Record one event (a no-op before ``open``)."""
    if _path is None:
        return
    line = {"time": round(time.time(), 3), "event": kind, "user": user, **fields}
    _log.info(json.dumps(line, default=str, sort_keys=False))


def read(since: float | None = None, user: str | None = None, event_kind: str | None = None,
         limit: int = 1000) -> list[dict]:
    """The newest ``limit`` events (oldest first), from ``since`` (Unix seconds), about ``user``."""
    if _path is None:
        return []
    for h in _log.handlers:
        h.flush()
    files = [Path(f"{_path}.{i}") for i in range(BACKUPS, 0, -1)] + [_path]
    out: list[dict] = []
    for f in files:
        try:
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for text in lines:
            try:
                e = json.loads(text)
            except ValueError:
                continue
            if since is not None and e.get("time", 0) < since:
                continue
            if user is not None and user not in (e.get("user"), e.get("target"), e.get("owner")):
                continue
            if event_kind is not None and e.get("event") != event_kind:
                continue
            out.append(e)
    return out[-limit:]
