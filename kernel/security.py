"""Users, tokens, capabilities, quotas and rate limits.

Identity comes only from the token in each request: a ZeroMQ routing id is never trusted.
Tokens are stored as SHA-256 hashes in ``<state>/users.json`` (mode 0600), written atomically.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmos.kernel import audit
from llmos.syscalls.errors import SyscallError
from llmos.syscalls.table import CAPABILITIES, HOST_CAP

ROOT_UID = 0
DEFAULT_CAPS = tuple(c for c in CAPABILITIES if c not in ("admin", HOST_CAP, "metrics"))
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
_Z85 = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


@dataclass
class User:
    name: str
    uid: int
    caps: frozenset[str]
    token_hashes: list[str] = field(default_factory=list)
    share: float = 1.0               # fair-share weight (``user_set``)
    keys: list[str] = field(default_factory=list)   # CURVE client public keys (Z85) that may speak for it

    @property
    def is_root(self) -> bool:
        return self.uid == ROOT_UID


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "llmos_" + secrets.token_urlsafe(32)


class UserDB:
    """The kernel's user table, persisted in one JSON file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.users: dict[str, User] = {}
        self.by_hash: dict[str, User] = {}
        self.next_uid = 1000
        if self.path.exists():
            self._load()

    def bootstrap(self) -> str | None:
        """At first boot create root and return its token (shown once); later boots return None."""
        if "root" in self.users:
            return None
        token = new_token()
        self.users["root"] = User("root", ROOT_UID, frozenset(CAPABILITIES), [hash_token(token)])
        self._save()
        return token

    def authenticate(self, token: str | None) -> User:
        if not token:
            raise SyscallError("EACCES", "no token: every request must carry one")
        user = self.by_hash.get(hash_token(token))
        if user is None:
            raise SyscallError("EACCES", "bad token")
        return user

    @staticmethod
    def check_cap(user: User, cap: str | None, call: str) -> None:
        if cap is not None and cap not in user.caps:
            audit.event("cap_refused", user=user.name, call=call, cap=cap)
            raise SyscallError("EPERM", f"{call} needs capability '{cap}', which user {user.name} lacks")

    @staticmethod
    def check_key(user: User, key: str | None) -> None:
        """Over CURVE (``key``), a user with registered client keys speaks only through one."""
        if key is not None and user.keys and key not in user.keys:
            raise SyscallError("EPERM", f"this client key may not speak for user {user.name}: it has registered "
                                        f"keys and this is not one of them (llmos user key add {user.name} FILE)")

    def set_key(self, name: str, key: str, add: bool) -> User:
        """Register (``add``) or drop a client public key of user ``name``."""
        user = self.get(name)
        if not isinstance(key, str) or len(key) != 40 or set(key) - _Z85:
            raise SyscallError("EINVAL", "a client key is a CURVE public key: 40 characters of Z85")
        if add and key not in user.keys:
            user.keys.append(key)
        elif not add:
            if key not in user.keys:
                raise SyscallError("ENOENT", f"user {name} has no such key")
            user.keys.remove(key)
        self._save()
        return user

    def add(self, name: str, caps: list[str] | None = None) -> tuple[User, str]:
        if not name or set(name) - _NAME_OK:
            raise SyscallError("EINVAL", "user names use letters, digits, '_', '-', '.'")
        if name in self.users:
            raise SyscallError("EEXIST", f"user {name} exists")
        caps = DEFAULT_CAPS if caps is None else tuple(caps)
        bad = [c for c in caps if c not in CAPABILITIES]
        if bad:
            raise SyscallError("EINVAL", f"unknown capabilities {bad}; known: {list(CAPABILITIES)}")
        token = new_token()
        user = User(name, self.next_uid, frozenset(caps), [hash_token(token)])
        self.next_uid += 1
        self.users[name] = user
        self._save()
        return user, token

    def new_token(self, name: str) -> str:
        user = self.users.get(name)
        if user is None:
            raise SyscallError("ENOENT", f"no user {name}")
        token = new_token()
        user.token_hashes.append(hash_token(token))
        self._save()
        return token

    def get(self, name: str) -> User:
        user = self.users.get(name)
        if user is None:
            raise SyscallError("ENOENT", f"no user {name}")
        return user

    def set_share(self, name: str, share: float) -> User:
        user = self.get(name)
        user.share = float(share)
        self._save()
        return user

    def by_uid(self, uid: int) -> User:
        for u in self.users.values():
            if u.uid == uid:
                return u
        raise SyscallError("ENOENT", f"no user with uid {uid}")

    def name_of(self, uid: int) -> str:
        for u in self.users.values():
            if u.uid == uid:
                return u.name
        return str(uid)

    def export(self) -> dict:
        """The whole table as saved (token hashes, not tokens): what ``users_sync`` copies to
        the other kernels of a cluster."""
        return json.loads(self.path.read_text())

    def replace(self, data: dict) -> None:
        """Take ``data`` (an ``export``) as the whole table, saved; ``EINVAL`` if malformed."""
        fresh = UserDB.__new__(UserDB)
        fresh.path, fresh.users, fresh.next_uid = self.path, {}, 1000
        try:
            fresh._read(data)
            assert fresh.users["root"].uid == ROOT_UID
        except (KeyError, TypeError, ValueError, AttributeError, AssertionError) as exc:
            raise SyscallError("EINVAL", f"not a user table ({type(exc).__name__}: {exc})"[:200])
        self.users, self.next_uid = fresh.users, fresh.next_uid
        self._save()

    def _load(self) -> None:
        self._read(json.loads(self.path.read_text()))

    def _read(self, data: dict) -> None:
        self.next_uid = int(data.get("next_uid", 1000))
        for name, u in data["users"].items():
            self.users[str(name)] = User(str(name), int(u["uid"]), frozenset(map(str, u["caps"])),
                                         list(map(str, u["token_hashes"])), float(u.get("share", 1.0)),
                                         list(map(str, u.get("keys", []))))
        self._index()

    def _save(self) -> None:
        data = {"next_uid": self.next_uid,
                "users": {n: {"uid": u.uid, "caps": sorted(u.caps), "token_hashes": u.token_hashes,
                              "share": u.share, "keys": u.keys} for n, u in self.users.items()}}
        write_private(self.path, json.dumps(data, indent=1))
        self._index()

    def _index(self) -> None:
        self.by_hash = {h: u for u in self.users.values() for h in u.token_hashes}


def write_private(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path`` with mode 0600 (write, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_private_dir(path: Path, what: str, instead: str) -> None:
    """Make ``path`` a directory only its owner can enter (mode 0700), creating it if needed.

    An existing directory is chmodded only when it is ours and not shared. A shared one (owned
    by another user, or sticky, group- or other-writable, like /tmp) is left as it is and
    raises PermissionError, naming ``what`` the directory was for and suggesting ``instead``.
    The mode is checked and changed through one descriptor: the directory checked is the one
    changed."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.fstat(fd)
        shared = _shared_because(st)
        if shared:
            raise PermissionError(f"refusing to use {path} as {what}: it is a shared directory ({shared}), "
                                  f"and making it private (mode 0700) would take it from its other users; "
                                  f"use a directory of your own instead, e.g. {instead}")
        os.fchmod(fd, 0o700)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise PermissionError(f"{path} ({what}) must have mode 0700, it has {stat.S_IMODE(st.st_mode):04o}")


def _shared_because(st: os.stat_result) -> str:
    """Why a directory is shared with other users ('' when it is not)."""
    mode = stat.S_IMODE(st.st_mode)
    reasons = [f"owned by uid {st.st_uid}"] if st.st_uid != os.getuid() else []
    reasons += [name for bit, name in ((stat.S_ISVTX, "sticky"), (stat.S_IWGRP, "group-writable"),
                                       (stat.S_IWOTH, "world-writable")) if mode & bit]
    return f"{', '.join(reasons)}; mode {mode:04o}" if reasons else ""


def own_subdir(shared: Path) -> Path:
    """A directory of this user's own to suggest inside a shared one."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = str(os.getuid())
    return shared / f"llmos-{name}"


class RateLimiter:
    """A token bucket per uid: ``rate`` calls per second with bursts of ``burst``. 0 = unlimited."""

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.buckets: dict[int, tuple[float, float]] = {}    # uid -> (tokens, last time)

    def allow(self, uid: int) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        tokens, last = self.buckets.get(uid, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[uid] = (tokens, now)
            return False
        self.buckets[uid] = (tokens - 1.0, now)
        return True
