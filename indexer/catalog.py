"""The catalog: one SQLite file (WAL mode) that is the source of truth of an index.

It holds every adapter's facts *and* its embedding (float32 blob), so the FAISS files are
rebuildable snapshots (DESIGN decision 5). WAL lets readers keep reading a consistent
snapshot while the single writer commits; ``synchronous=FULL`` makes a commit durable
before it is acknowledged. Every write transaction bumps a global ``generation`` and stamps
it on the families it touched, which is how a FAISS snapshot is matched to catalog state.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lorasearch.errors import IncompatibleError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused
    path       TEXT NOT NULL UNIQUE,
    sha256     TEXT NOT NULL,
    size       INTEGER,
    mtime_ns   INTEGER,
    format     TEXT,
    family     TEXT NOT NULL,
    ranks      TEXT,
    n_modules  INTEGER,
    delta_norm REAL,
    metadata   TEXT,
    info       TEXT,
    embedding  BLOB NOT NULL,
    added_at   TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_family ON adapters(family, id);
CREATE INDEX IF NOT EXISTS adapters_sha256 ON adapters(sha256);
CREATE TABLE IF NOT EXISTS families (name TEXT PRIMARY KEY, generation INTEGER NOT NULL);
"""

# columns returned by record queries (the embedding is fetched separately: it is big)
RECORD_COLUMNS = ("id", "path", "sha256", "size", "mtime_ns", "format", "family", "ranks",
                  "n_modules", "delta_norm", "metadata", "info", "added_at", "updated_at")
_JSON_COLUMNS = ("ranks", "metadata", "info")
_SELECT = f"SELECT {', '.join(RECORD_COLUMNS)} FROM adapters"


def _json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=_json_default)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _record(row: tuple) -> dict:
    rec = dict(zip(RECORD_COLUMNS, row))
    for col in _JSON_COLUMNS:
        if rec[col] is not None:
            rec[col] = json.loads(rec[col])
    return rec


class Catalog:
    """A thin, explicit wrapper: callers open transactions with ``read()`` / ``write()``."""

    def __init__(self, path: Path, readonly: bool, new: bool = False):
        self.path = path
        self.readonly = readonly
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        # isolation_level=None: no implicit transactions, we issue BEGIN/COMMIT ourselves
        self.conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            self.conn.execute("PRAGMA busy_timeout = 10000")
            if new:
                # rows are ~dim*4 bytes (the embedding): with the default 4 KiB pages a 512-d row
                # (2 KiB + text) leaves half of each page empty; 16 KiB pages hold 7 of them
                self.conn.execute("PRAGMA page_size = 16384")
            if not readonly:
                self.conn.execute("PRAGMA journal_mode = WAL")
                self.conn.execute("PRAGMA synchronous = FULL")
                self.conn.execute("PRAGMA journal_size_limit = 33554432")   # WAL file kept <= 32 MiB
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise IncompatibleError(f"{path}: not a lorasearch catalog ({e})") from None

    @classmethod
    def create(cls, path: Path, meta: dict[str, Any] | None = None) -> "Catalog":
        """Create the schema; ``meta`` entries are recorded in the same transaction (so a
        concurrent opener never sees the schema without them)."""
        cat = cls(path, readonly=False, new=True)
        with cat.write():
            for statement in _SCHEMA.split(";"):   # executescript() would commit mid-transaction
                if statement.strip():
                    cat.conn.execute(statement)
            entries = [("schema_version", SCHEMA_VERSION), ("generation", 0)]
            entries += [(k, v) for k, v in (meta or {}).items() if v is not None]
            for key, value in entries:
                cat.conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))
        return cat

    def check_schema(self) -> None:
        try:
            version = self.meta("schema_version")
        except sqlite3.DatabaseError as e:
            raise IncompatibleError(f"{self.path}: not a lorasearch catalog ({e})") from None
        if version is None or int(version) > SCHEMA_VERSION:
            raise IncompatibleError(f"{self.path}: catalog schema version {version} is not supported "
                                    f"by this lorasearch (knows up to {SCHEMA_VERSION})")

    def close(self) -> None:
        self.conn.close()

    # -- transactions -------------------------------------------------------------------
    @contextmanager
    def read(self) -> Iterator[None]:
        """A consistent read snapshot across several statements (WAL: never blocks a writer)."""
        if self.conn.in_transaction:       # nested inside a write or read: reuse it
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    @contextmanager
    def write(self) -> Iterator[None]:
        """One atomic, durable write transaction."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                          "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, str(value)))

    def generation(self) -> int:
        return int(self.meta("generation") or 0)

    def bump(self, families: set[str]) -> int:
        """Inside a write: new global generation, stamped on the touched families; empty families dropped."""
        gen = self.generation() + 1
        self.set_meta("generation", gen)
        for fam in families:
            if self.conn.execute("SELECT 1 FROM adapters WHERE family = ? LIMIT 1", (fam,)).fetchone():
                self.conn.execute("INSERT INTO families(name, generation) VALUES (?, ?) ON CONFLICT(name) "
                                  "DO UPDATE SET generation = excluded.generation", (fam, gen))
            else:
                self.conn.execute("DELETE FROM families WHERE name = ?", (fam,))
        return gen

    def family_generations(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT name, generation FROM families"))

    # -- writes (call inside write()) ---------------------------------------------------
    def upsert(self, rec: dict, embedding: bytes) -> tuple[int, str | None]:
        """Insert or replace the row for ``rec['path']``; returns (id, previous family or None).

        An existing path keeps its id (and ``added_at``): ids are stable per path.
        """
        old = self.conn.execute("SELECT id, family FROM adapters WHERE path = ?", (rec["path"],)).fetchone()
        values = (rec["sha256"], rec.get("size"), rec.get("mtime_ns"), rec.get("format"), rec["family"],
                  _dumps(rec.get("ranks")), rec.get("n_modules"),
                  None if rec.get("delta_norm") is None else float(rec["delta_norm"]),
                  _dumps(rec.get("metadata")), _dumps(rec.get("info")), embedding, _now())
        if old is not None:
            self.conn.execute(
                "UPDATE adapters SET sha256=?, size=?, mtime_ns=?, format=?, family=?, ranks=?, n_modules=?, "
                "delta_norm=?, metadata=?, info=?, embedding=?, updated_at=? WHERE id=?", values + (old[0],))
            return int(old[0]), old[1]
        cur = self.conn.execute(
            "INSERT INTO adapters(sha256, size, mtime_ns, format, family, ranks, n_modules, delta_norm, "
            "metadata, info, embedding, updated_at, path, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            values + (rec["path"], values[-1]))
        return int(cur.lastrowid), None

    def touch(self, adapter_id: int, size: int | None, mtime_ns: int | None) -> bool:
        cur = self.conn.execute("UPDATE adapters SET size = COALESCE(?, size), mtime_ns = COALESCE(?, mtime_ns), "
                                "updated_at = ? WHERE id = ?", (size, mtime_ns, _now(), adapter_id))
        return cur.rowcount > 0

    def delete(self, adapter_id: int) -> str | None:
        """Delete one row; returns its family, or None if there was no such id."""
        row = self.conn.execute("DELETE FROM adapters WHERE id = ? RETURNING family", (adapter_id,)).fetchone()
        return None if row is None else row[0]

    # -- reads --------------------------------------------------------------------------
    def get(self, adapter_id: int) -> dict | None:
        row = self.conn.execute(f"{_SELECT} WHERE id = ?", (int(adapter_id),)).fetchone()
        return None if row is None else _record(row)

    def by_path(self, path: str) -> dict | None:
        row = self.conn.execute(f"{_SELECT} WHERE path = ?", (path,)).fetchone()
        return None if row is None else _record(row)

    def families_of_paths(self, paths: list[str]) -> set[str]:
        out: set[str] = set()
        for start in range(0, len(paths), 500):        # stay under SQLite's bound-parameter limit
            chunk = paths[start:start + 500]
            marks = ",".join("?" * len(chunk))
            out.update(r[0] for r in self.conn.execute(
                f"SELECT DISTINCT family FROM adapters WHERE path IN ({marks})", chunk))
        return out

    def fingerprints(self) -> dict[str, tuple]:
        return {r[0]: tuple(r[1:]) for r in self.conn.execute(
            "SELECT path, id, size, mtime_ns, sha256, family FROM adapters")}

    def by_sha256(self, sha: str) -> list[dict]:
        return [_record(r) for r in self.conn.execute(f"{_SELECT} WHERE sha256 = ? ORDER BY id", (sha,))]

    def records(self, family: str | None = None) -> list[dict]:
        if family is None:
            rows = self.conn.execute(f"{_SELECT} ORDER BY id")
        else:
            rows = self.conn.execute(f"{_SELECT} WHERE family = ? ORDER BY id", (family,))
        return [_record(r) for r in rows]

    def count(self, family: str | None = None) -> int:
        if family is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0])
        return int(self.conn.execute("SELECT COUNT(*) FROM adapters WHERE family = ?", (family,)).fetchone()[0])

    def families(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT family, COUNT(*) FROM adapters GROUP BY family ORDER BY family"))

    def family_ids(self, family: str) -> np.ndarray:
        rows = self.conn.execute("SELECT id FROM adapters WHERE family = ? ORDER BY id", (family,)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def family_vectors(self, family: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """All (ids, float32 [n, dim] embeddings) of a family, ordered by id."""
        rows = self.conn.execute("SELECT id, embedding FROM adapters WHERE family = ? ORDER BY id",
                                 (family,)).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return ids, vecs.copy()

    def embeddings(self, ids: list[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):        # stay under SQLite's bound-parameter limit
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            out.update(self.conn.execute(f"SELECT id, embedding FROM adapters WHERE id IN ({marks})", chunk))
        return out
