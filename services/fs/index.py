"""The metadata index: one SQLite database in WAL mode with synchronous=FULL.

Tables::

    blobs  (sha256 PK, size, refs)            refs = number of files rows naming the blob; a row
                                              is deleted in the same transaction that drops it to 0
    files  (uid, path) PK, sha256, size, mtime
    shares (owner, reader, prefix) PK         reader may read owner's files under prefix
    quotas (uid PK, bytes)                    absent = the store's default quota

Every change the store makes is one transaction (``with index.tx():``), so a crash leaves the
index at the state before or after it. With synchronous=FULL a commit has fsynced the WAL
before ``COMMIT`` returns. Callers serialise access with the store's lock.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmos.services.fs.paths import ancestors, subtree_range

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, refs INTEGER NOT NULL CHECK (refs >= 0)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    uid INTEGER NOT NULL, path TEXT NOT NULL,
    sha256 TEXT NOT NULL REFERENCES blobs(sha256),
    size INTEGER NOT NULL, mtime REAL NOT NULL,
    PRIMARY KEY (uid, path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_by_blob ON files(sha256);
CREATE TABLE IF NOT EXISTS shares (
    owner INTEGER NOT NULL, reader INTEGER NOT NULL, prefix TEXT NOT NULL,
    PRIMARY KEY (owner, reader, prefix)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quotas (uid INTEGER PRIMARY KEY, bytes INTEGER NOT NULL);
"""
FILE_COLS = "uid, path, sha256, size, mtime"


@dataclass(frozen=True)
class FileRow:
    uid: int
    path: str
    sha256: str
    size: int
    mtime: float


class Index:
    def __init__(self, db_path: Path):
        # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT in tx().
        self.db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        assert mode == "wal", f"sqlite refused WAL mode: {mode}"
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self):
        """One atomic, durable transaction; rolled back if the body raises."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        try:
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:        # e.g. SQLITE_FULL: the commit did not happen
                self.db.execute("ROLLBACK")
            raise

    # ----- files -----
    def get_file(self, uid: int, path: str) -> FileRow | None:
        row = self.db.execute(f"SELECT {FILE_COLS} FROM files WHERE uid=? AND path=?", (uid, path)).fetchone()
        return FileRow(*row) if row else None

    def files_under(self, uid: int, prefix: str) -> list[FileRow]:
        """Files at ``prefix`` or below it, sorted by path (``""`` = the whole namespace)."""
        if prefix == "":
            rows = self.db.execute(f"SELECT {FILE_COLS} FROM files WHERE uid=? ORDER BY path", (uid,))
        else:
            lo, hi = subtree_range(prefix)
            rows = self.db.execute(
                f"SELECT {FILE_COLS} FROM files WHERE uid=? AND (path=? OR (path>=? AND path<?)) ORDER BY path",
                (uid, prefix, lo, hi))
        return [FileRow(*r) for r in rows]

    def file_ancestor(self, uid: int, path: str) -> str | None:
        """The first directory of ``path`` that is a file instead, if any."""
        dirs = ancestors(path)
        if not dirs:
            return None
        row = self.db.execute(
            f"SELECT path FROM files WHERE uid=? AND path IN ({','.join('?' * len(dirs))}) ORDER BY length(path)",
            (uid, *dirs)).fetchone()
        return row[0] if row else None

    def is_dir(self, uid: int, path: str) -> bool:
        lo, hi = subtree_range(path)
        return self.db.execute("SELECT 1 FROM files WHERE uid=? AND path>=? AND path<? LIMIT 1",
                               (uid, lo, hi)).fetchone() is not None

    def put_file(self, row: FileRow) -> str | None:
        """Point (uid, path) at a blob, replacing any old version; return a blob freed by it."""
        old = self.get_file(row.uid, row.path)
        self.add_ref(row.sha256, row.size)
        self.db.execute(f"INSERT OR REPLACE INTO files ({FILE_COLS}) VALUES (?,?,?,?,?)",
                        (row.uid, row.path, row.sha256, row.size, row.mtime))
        return self.drop_ref(old.sha256) if old else None

    def delete_file(self, uid: int, path: str) -> str | None:
        old = self.get_file(uid, path)
        assert old is not None
        self.db.execute("DELETE FROM files WHERE uid=? AND path=?", (uid, path))
        return self.drop_ref(old.sha256)

    def rename_file(self, uid: int, src: str, dst: str) -> None:
        self.db.execute("UPDATE files SET path=? WHERE uid=? AND path=?", (dst, uid, src))

    # ----- blob reference counts -----
    def add_ref(self, sha: str, size: int) -> None:
        self.db.execute("INSERT INTO blobs (sha256, size, refs) VALUES (?,?,1) "
                        "ON CONFLICT(sha256) DO UPDATE SET refs=refs+1", (sha, size))

    def drop_ref(self, sha: str) -> str | None:
        """Drop one reference; return ``sha`` if that was the last (its row is then gone)."""
        self.db.execute("UPDATE blobs SET refs=refs-1 WHERE sha256=?", (sha,))
        if self.db.execute("DELETE FROM blobs WHERE sha256=? AND refs=0", (sha,)).rowcount:
            return sha
        return None

    def refs(self, sha: str) -> int:
        row = self.db.execute("SELECT refs FROM blobs WHERE sha256=?", (sha,)).fetchone()
        return row[0] if row else 0

    def blob_refs(self) -> dict[str, tuple[int, int]]:
        """sha256 -> (size, refs) for every blob the index knows."""
        return {sha: (size, refs) for sha, size, refs in self.db.execute("SELECT sha256, size, refs FROM blobs")}

    def ref_mismatches(self) -> list[tuple[str, int, int]]:
        """(sha, stored refs, counted refs) wherever the two disagree, in either direction."""
        return list(self.db.execute("""
            SELECT b.sha256, b.refs, COUNT(f.sha256) FROM blobs b LEFT JOIN files f ON f.sha256 = b.sha256
            GROUP BY b.sha256 HAVING b.refs != COUNT(f.sha256)
            UNION ALL
            SELECT f.sha256, 0, COUNT(*) FROM files f WHERE f.sha256 NOT IN (SELECT sha256 FROM blobs)
            GROUP BY f.sha256"""))

    # ----- quotas -----
    def usage(self, uid: int) -> int:
        return self.db.execute("SELECT COALESCE(SUM(size), 0) FROM files WHERE uid=?", (uid,)).fetchone()[0]

    def quota(self, uid: int, default: int) -> int:
        row = self.db.execute("SELECT bytes FROM quotas WHERE uid=?", (uid,)).fetchone()
        return row[0] if row else default

    def set_quota(self, uid: int, num_bytes: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO quotas (uid, bytes) VALUES (?,?)", (uid, num_bytes))

    # ----- shares -----
    def add_share(self, owner: int, prefix: str, reader: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO shares (owner, reader, prefix) VALUES (?,?,?)",
                        (owner, reader, prefix))

    def remove_share(self, owner: int, prefix: str, reader: int) -> bool:
        return self.db.execute("DELETE FROM shares WHERE owner=? AND reader=? AND prefix=?",
                               (owner, reader, prefix)).rowcount > 0

    def granted_prefixes(self, owner: int, reader: int) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT prefix FROM shares WHERE owner=? AND reader=? ORDER BY prefix", (owner, reader))]

    def shares_of(self, uid: int) -> list[tuple[int, str, int]]:
        """(owner, prefix, reader) for every grant ``uid`` gave or received."""
        return list(self.db.execute("SELECT owner, prefix, reader FROM shares WHERE owner=? OR reader=? "
                                    "ORDER BY owner, prefix, reader", (uid, uid)))
