"""Path names inside one user's namespace: POSIX-like, relative, normalised, never escaping.

A file path is ``"a/b/c"``: no leading or trailing slash, no empty, ``.`` or ``..`` parts.
Directories are implicit: ``"a"`` is a directory while some file lies under ``"a/"``.
A *prefix* (for ``list`` and ``share``) is a path or ``""`` meaning the whole namespace, and
covers itself and everything below it, by whole components (``"data"`` does not cover
``"datasets/x"``).
"""
from __future__ import annotations

from llmos.services.fs.errors import FsError

MAX_PATH = 4096
MAX_PART = 255


def normpath(path: object, *, allow_root: bool = False) -> str:
    """Return the canonical form of ``path``; raise EINVAL for anything that is not a clean
    relative name (``..`` anywhere, NUL or other control characters, over-long names)."""
    if not isinstance(path, str):
        raise FsError("EINVAL", f"path must be a string, not {type(path).__name__}")
    if path.startswith("/"):
        raise FsError("EINVAL", f"path {path!r}: absolute paths are not allowed (paths are relative "
                                f"to your namespace)")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    norm = "/".join(parts)
    if ".." in parts:
        raise FsError("EINVAL", f"path {path!r}: '..' is not allowed")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in norm):
        raise FsError("EINVAL", f"path {path!r}: control characters are not allowed")
    try:
        encoded = norm.encode("utf-8")
    except UnicodeEncodeError:
        raise FsError("EINVAL", f"path {path!r} is not valid Unicode") from None
    if len(encoded) > MAX_PATH or any(len(p) > MAX_PART for p in parts):
        raise FsError("EINVAL", f"path {path[:64]!r}...: too long")
    if not norm and not allow_root:
        raise FsError("EINVAL", f"path {path!r} names no file")
    return norm


def ancestors(path: str) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b"]``: the directories a file path lies in."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def covers(prefix: str, path: str) -> bool:
    """Whether ``prefix`` (normalised, ``""`` = everything) covers ``path``."""
    return prefix == "" or path == prefix or path.startswith(prefix + "/")


def subtree_range(prefix: str) -> tuple[str, str]:
    """Half-open string range [lo, hi) holding exactly the paths strictly below ``prefix``
    ('/' is 0x2F and '0' is 0x30, so every ``prefix + '/...'`` sorts inside it)."""
    return prefix + "/", prefix + "0"
