"""On-disk durability: an fsynced write-ahead log and atomically replaced snapshots.

Log format: one operation per line, ``<crc32 as 8 hex digits> <JSON>\\n``. ``append`` returns
only after the bytes are on stable storage (``fdatasync``), so an acknowledged operation
survives a crash. Only the last line can be incomplete (each append waits for the previous one
to be durable), so ``replay`` treats a bad *last* line as a torn write and cuts it off; a bad
line with good lines after it is real damage and raises ``EIO`` rather than silently dropping
acknowledged writes.

Snapshots are written to a temporary file, fsynced, renamed over the old one and the directory
fsynced: a reader sees the old snapshot or the new one, never a mix.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from llmos.services.durable import fsync_dir
from llmos.services.kg.errors import KgError


def _encode(record: dict) -> bytes:
    payload = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _decode(line: bytes) -> dict | None:
    """The record on one line (without its newline), or None if it is not intact."""
    crc, _, payload = line.partition(b" ")
    try:
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class WriteAheadLog:
    """An append-only journal of operations at ``path`` (created mode 0600 if absent)."""

    def __init__(self, path: Path):
        self.path = path
        created = not path.exists()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if created:
            fsync_dir(path.parent)
        self.num_ops = 0
        self.num_bytes = 0

    def replay(self) -> list[dict]:
        """Every intact record in order; a torn tail is cut off the file first."""
        with open(self.path, "rb") as f:
            data = f.read()
        records, good_end = [], 0
        lines = data.split(b"\n")
        # The piece after the last newline is an unfinished append (or empty).
        for i, line in enumerate(lines[:-1]):
            record = _decode(line)
            if record is None:
                if any(lines[i + 1:-1]) or lines[-1]:
                    raise KgError("EIO", f"{self.path}: damaged record at line {i + 1} "
                                         "followed by further records")
                break  # a torn final line: its append was never acknowledged
            records.append(record)
            good_end += len(line) + 1
        if good_end != len(data):
            os.ftruncate(self.fd, good_end)
            os.fsync(self.fd)
        self.num_ops, self.num_bytes = len(records), good_end
        return records

    def append(self, record: dict) -> None:
        """Write one record and return once it is durable; on failure leave no partial line."""
        data = _encode(record)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fdatasync(self.fd)
        except OSError as exc:
            try:
                os.ftruncate(self.fd, self.num_bytes)
            except OSError:
                pass
            raise KgError("EIO", f"write-ahead log {self.path}: {exc.strerror}") from None
        self.num_ops += 1
        self.num_bytes += len(data)

    def reset(self) -> None:
        """Empty the log (its records are in a durable snapshot now)."""
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)
        self.num_ops = self.num_bytes = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_snapshot(path: Path, state: dict) -> int:
    """Atomically replace ``path`` with ``state`` as JSON; returns its size in bytes."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(state, ensure_ascii=False, separators=(",", ":")).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return len(data)


def read_snapshot(path: Path) -> dict | None:
    """The last snapshot, or None if there is none. A snapshot is complete or absent."""
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # a compaction cut short
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        state = json.loads(data)
    except ValueError as exc:
        raise KgError("EIO", f"{path}: unreadable snapshot: {exc}") from None
    if not isinstance(state, dict):
        raise KgError("EIO", f"{path}: unreadable snapshot")
    return state
