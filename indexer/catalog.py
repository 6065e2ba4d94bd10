"""The catalog: one SQLite file (WAL mode) that is the source of truth of an index.

It holds every adapter's facts *and* its embedding (float32 blob), so the FAISS files are
rebuildable snapshots (DESIGN decision 5). WAL lets readers keep reading a consistent
snapshot while the single writer commits; ``synchronous=FULL`` makes a commit durable
before it is acknowledged. Every write transaction bumps a global ``generation`` and stamps
it on the families it touched *and on the rows it wrote* (``adapters.gen``); a removal leaves a
tombstone ``(family, id, gen)``. A family's FAISS base snapshot is named by the generation it
reflects (``families.base``), so what changed since it is the rows and tombstones with a larger
``gen``: a write costs one indexed row, never a rewrite of the vectors (see ``segments.py``).

Schema 2 (this file) adds ``adapters.gen``, ``families.base`` / ``base_n``, ``tombstones`` and
``rerank`` (a compact per-adapter blob for exact re-scoring, written with its row). A schema-1
catalog is migrated in place, in one transaction, by the first writable open; a read-only open
of one reads it as it is (its snapshots are then whole: base = generation, no deltas).
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lorasearch.errors import IncompatibleError

SCHEMA_VERSION = 2
RERANK_MAX_BYTES = 64 << 20      # a re-rank blob is a compact summary; anything bigger is a caller bug

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
    updated_at TEXT NOT NULL,
    gen        INTEGER NOT NULL DEFAULT 0   -- generation of the transaction that last wrote the vector
);
CREATE INDEX IF NOT EXISTS adapters_family ON adapters(family, id);
CREATE INDEX IF NOT EXISTS adapters_sha256 ON adapters(sha256);
CREATE TABLE IF NOT EXISTS families (name TEXT PRIMARY KEY, generation INTEGER NOT NULL,
                                     base INTEGER NOT NULL DEFAULT 0, base_n INTEGER NOT NULL DEFAULT 0);
"""
# schema 2 additions: also the migration of a schema-1 catalog (run after the v1 statements above)
_SCHEMA_2 = """
CREATE INDEX IF NOT EXISTS adapters_family_gen ON adapters(family, gen);
CREATE TABLE IF NOT EXISTS tombstones (family TEXT NOT NULL, id INTEGER NOT NULL, gen INTEGER NOT NULL,
                                       PRIMARY KEY (family, id));
CREATE INDEX IF NOT EXISTS tombstones_gen ON tombstones(family, gen);
CREATE TABLE IF NOT EXISTS rerank (id INTEGER PRIMARY KEY, blob BLOB NOT NULL);
"""
_MIGRATE_1_TO_2 = """
ALTER TABLE adapters ADD COLUMN gen INTEGER NOT NULL DEFAULT 0;
ALTER TABLE families ADD COLUMN base INTEGER NOT NULL DEFAULT 0;
ALTER TABLE families ADD COLUMN base_n INTEGER NOT NULL DEFAULT 0;
UPDATE families SET base = generation, base_n = (SELECT COUNT(*) FROM adapters WHERE family = families.name);
"""


def _statements(script: str) -> list[str]:
    """executescript() would commit mid-transaction: run statements one by one instead."""
    return [s for s in script.split(";") if s.strip()]

# columns returned by record queries (the embedding is fetched separately: it is big)
RECORD_COLUMNS = ("id", "path", "sha256", "size", "mtime_ns", "format", "family", "ranks",
                  "n_modules", "delta_norm", "metadata", "info", "added_at", "updated_at")
_JSON_COLUMNS = ("ranks", "metadata", "info")
_SELECT = f"SELECT {', '.join(RECORD_COLUMNS)} FROM adapters"
BRIEF_COLUMNS = tuple(c for c in RECORD_COLUMNS if c not in _JSON_COLUMNS)
_SELECT_BRIEF = f"SELECT {', '.join(BRIEF_COLUMNS)} FROM adapters"


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


def _chunks(items: list, size: int = 500):
    """Stay under SQLite's bound-parameter limit."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _record(row: tuple) -> dict:
    rec = dict(zip(RECORD_COLUMNS, row))
    for col in _JSON_COLUMNS:
        if rec[col] is not None:
            rec[col] = json.loads(rec[col])
    return rec


class Catalog:
    """A thin, explicit wrapper: callers open transactions with ``read()`` / ``write()``."""

    def __init__(self, path: Path, readonly: bool, new: bool = False, wal: bool = True):
        self.path = path
        self.readonly = readonly
        self.version = SCHEMA_VERSION            # the real one is read by check_schema()
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        # isolation_level=None: no implicit transactions, we issue BEGIN/COMMIT ourselves
        self.conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            self.conn.execute("PRAGMA busy_timeout = 10000")
            if new:
                # rows are ~dim*4 bytes (the embedding): with the default 4 KiB pages a 512-d row
                # (2 KiB + text) leaves half of each page empty; 16 KiB pages hold 7 of them
                self.conn.execute("PRAGMA page_size = 16384")
            if not readonly and wal:
                self.conn.execute("PRAGMA journal_mode = WAL")
                self.conn.execute("PRAGMA synchronous = FULL")
                self.conn.execute("PRAGMA journal_size_limit = 33554432")   # WAL file kept <= 32 MiB
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise IncompatibleError(f"{path}: not a lorasearch catalog ({e})") from None

    @classmethod
    def create(cls, path: Path, meta: dict[str, Any] | None = None, wal: bool = True) -> "Catalog":
        """Create the schema; ``meta`` entries are recorded in the same transaction (so a
        concurrent opener never sees the schema without them)."""
        cat = cls(path, readonly=False, new=True, wal=wal)
        with cat.write():
            for statement in _statements(_SCHEMA) + _statements(_SCHEMA_2):
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
        self.version = int(version)
        if self.version < SCHEMA_VERSION and not self.readonly:
            self.migrate()

    def migrate(self) -> None:
        """Bring a schema-1 catalog to schema 2 in one transaction (all of it or nothing)."""
        with self.write():
            version = int(self.meta("schema_version"))      # re-read under the write lock
            if version < 2:
                for statement in _statements(_MIGRATE_1_TO_2) + _statements(_SCHEMA_2):
                    self.conn.execute(statement)
                self.set_meta("schema_version", 2)
        self.version = SCHEMA_VERSION

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

    def next_generation(self) -> int:
        """Inside a write: the generation this transaction stamps (on rows, tombstones, families)."""
        gen = self.generation() + 1
        self.set_meta("generation", gen)
        return gen

    def bump(self, families: set[str], gen: int | None = None) -> int:
        """Inside a write: stamp ``gen`` (default: a new one) on the touched families; empty families
        are dropped (their base file goes at the next prune)."""
        gen = self.next_generation() if gen is None else gen
        for fam in families:
            if self.conn.execute("SELECT 1 FROM adapters WHERE family = ? LIMIT 1", (fam,)).fetchone():
                self.conn.execute("INSERT INTO families(name, generation) VALUES (?, ?) ON CONFLICT(name) "
                                  "DO UPDATE SET generation = excluded.generation", (fam, gen))
            else:
                # its tombstones stay: a reader still holding the family's old index catches up
                # through them if the family comes back (they go at that family's next compaction)
                self.conn.execute("DELETE FROM families WHERE name = ?", (fam,))
        return gen

    def family_generations(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT name, generation FROM families"))

    def family_state(self, family: str) -> tuple[int, int, int] | None:
        """``(generation, base, base_n)`` of a live family, or None."""
        if self.version < 2:     # schema 1 (read-only): the snapshot is whole at the generation
            row = self.conn.execute("SELECT generation, generation, -1 FROM families WHERE name = ?",
                                    (family,)).fetchone()
        else:
            row = self.conn.execute("SELECT generation, base, base_n FROM families WHERE name = ?",
                                    (family,)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))

    def family_bases(self) -> dict[str, int]:
        if self.version < 2:
            return self.family_generations()
        return dict(self.conn.execute("SELECT name, base FROM families"))

    def set_base(self, family: str, base: int, base_n: int) -> None:
        """Inside a write: the family's vectors up to generation ``base`` are in its base file now."""
        self.conn.execute("UPDATE families SET base = ?, base_n = ? WHERE name = ?", (base, base_n, family))
        self.conn.execute("DELETE FROM tombstones WHERE family = ? AND gen <= ?", (family, base))

    # -- deltas since a generation (what a base snapshot does not hold yet) ----------------
    def changed_since(self, family: str, gen: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 [n, dim]) of the family's rows written after generation ``gen``."""
        if self.version < 2:
            return np.empty(0, np.int64), np.empty((0, dim), np.float32)
        rows = self.conn.execute("SELECT id, embedding FROM adapters WHERE family = ? AND gen > ? ORDER BY id",
                                 (family, gen)).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return ids, vecs.copy()

    def removed_since(self, family: str, gen: int) -> np.ndarray:
        """Ids that left the family (removed, or moved to another family) after generation ``gen``."""
        if self.version < 2:
            return np.empty(0, np.int64)
        rows = self.conn.execute("SELECT id FROM tombstones WHERE family = ? AND gen > ?", (family, gen)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def delta_size(self, family: str, gen: int) -> int:
        """Rows + tombstones newer than ``gen``: O(delta) through the (family, gen) indexes."""
        if self.version < 2:
            return 0
        n = self.conn.execute("SELECT COUNT(*) FROM adapters WHERE family = ? AND gen > ?", (family, gen)).fetchone()[0]
        t = self.conn.execute("SELECT COUNT(*) FROM tombstones WHERE family = ? AND gen > ?", (family, gen)).fetchone()[0]
        return int(n) + int(t)

    # -- writes (call inside write()) ---------------------------------------------------
    def upsert(self, rec: dict, embedding: bytes, gen: int = 0) -> tuple[int, str | None]:
        """Insert or replace the row for ``rec['path']`` stamped with ``gen``; returns (id, previous
        family or None). An existing path keeps its id (and ``added_at``): ids are stable per path.
        ``rec["rerank"]`` (bytes, optional) is stored beside the row; without it an old blob is dropped
        (it described other bytes).
        """
        old = self.conn.execute("SELECT id, family FROM adapters WHERE path = ?", (rec["path"],)).fetchone()
        values = (rec["sha256"], rec.get("size"), rec.get("mtime_ns"), rec.get("format"), rec["family"],
                  _dumps(rec.get("ranks")), rec.get("n_modules"),
                  None if rec.get("delta_norm") is None else float(rec["delta_norm"]),
                  _dumps(rec.get("metadata")), _dumps(rec.get("info")), embedding, int(gen), _now())
        if old is not None:
            adapter_id = int(old[0])
            self.conn.execute(
                "UPDATE adapters SET sha256=?, size=?, mtime_ns=?, format=?, family=?, ranks=?, n_modules=?, "
                "delta_norm=?, metadata=?, info=?, embedding=?, gen=?, updated_at=? WHERE id=?",
                values + (adapter_id,))
            if old[1] != rec["family"]:
                self._tombstone(old[1], adapter_id, gen)
        else:
            cur = self.conn.execute(
                "INSERT INTO adapters(sha256, size, mtime_ns, format, family, ranks, n_modules, delta_norm, "
                "metadata, info, embedding, gen, updated_at, path, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                values + (rec["path"], values[-1]))
            adapter_id = int(cur.lastrowid)
        blob = rec.get("rerank")
        if blob is not None:
            self.conn.execute("INSERT INTO rerank(id, blob) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET "
                              "blob = excluded.blob", (adapter_id, sqlite3.Binary(bytes(blob))))
        elif old is not None:
            self.conn.execute("DELETE FROM rerank WHERE id = ?", (adapter_id,))
        return adapter_id, (None if old is None else old[1])

    def _tombstone(self, family: str, adapter_id: int, gen: int) -> None:
        self.conn.execute("INSERT INTO tombstones(family, id, gen) VALUES (?, ?, ?) ON CONFLICT(family, id) "
                          "DO UPDATE SET gen = excluded.gen", (family, adapter_id, gen))

    def touch(self, adapter_id: int, size: int | None, mtime_ns: int | None) -> bool:
        cur = self.conn.execute("UPDATE adapters SET size = COALESCE(?, size), mtime_ns = COALESCE(?, mtime_ns), "
                                "updated_at = ? WHERE id = ?", (size, mtime_ns, _now(), adapter_id))
        return cur.rowcount > 0

    def delete(self, adapter_id: int, gen: int = 0) -> str | None:
        """Delete one row (and its re-rank blob), leaving a tombstone stamped ``gen``; returns its
        family, or None if there was no such id."""
        row = self.conn.execute("DELETE FROM adapters WHERE id = ? RETURNING family", (adapter_id,)).fetchone()
        if row is None:
            return None
        self.conn.execute("DELETE FROM rerank WHERE id = ?", (adapter_id,))
        self._tombstone(row[0], adapter_id, gen)
        return row[0]

    # -- reads --------------------------------------------------------------------------
    def get(self, adapter_id: int) -> dict | None:
        row = self.conn.execute(f"{_SELECT} WHERE id = ?", (int(adapter_id),)).fetchone()
        return None if row is None else _record(row)

    def get_many(self, ids: list[int], brief: bool = False) -> dict[int, dict]:
        """``{id: record}`` for the ids that exist, in one statement per 500 ids (a query's hits).
        ``brief``: leave out the JSON columns (``ranks``, ``metadata``, ``info``: a file's metadata
        can be tens of kB to parse per hit)."""
        out: dict[int, dict] = {}
        select = _SELECT_BRIEF if brief else _SELECT
        for chunk in _chunks([int(i) for i in ids]):
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(f"{select} WHERE id IN ({marks})", chunk):
                out[int(row[0])] = dict(zip(BRIEF_COLUMNS, row)) if brief else _record(row)
        return out

    def rerank_blobs(self, ids: list[int]) -> dict[int, bytes]:
        if self.version < 2:
            return {}
        out: dict[int, bytes] = {}
        for chunk in _chunks([int(i) for i in ids]):
            marks = ",".join("?" * len(chunk))
            out.update((int(i), bytes(b)) for i, b in self.conn.execute(
                f"SELECT id, blob FROM rerank WHERE id IN ({marks})", chunk))
        return out

    def fingerprints_for(self, paths: list[str]) -> dict[str, tuple]:
        """``fingerprints()`` restricted to ``paths`` (looked up by the UNIQUE path index: O(len(paths)·log N))."""
        out: dict[str, tuple] = {}
        for chunk in _chunks(list(paths)):
            marks = ",".join("?" * len(chunk))
            out.update((r[0], tuple(r[1:])) for r in self.conn.execute(
                f"SELECT path, id, size, mtime_ns, sha256, family FROM adapters WHERE path IN ({marks})", chunk))
        return out

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


# -- creating a catalog atomically ------------------------------------------------------------
SQLITE_MAGIC = b"SQLite format 3\x00"
_CREATING = ".creating-"


def classify(path: Path) -> str:
    """What the file at ``path`` is: ``"catalog"``, ``"unfinished"`` (0 bytes, or an SQLite file
    with no tables and no WAL: a creation that was killed before its schema committed, by a
    lorasearch that did not create atomically), or ``"foreign: <what>"`` (never to be overwritten).
    Reads at most 16 bytes plus SQLite's schema table; never prints file contents."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"foreign: unreadable ({e.strerror or e})"
    if not head:
        wal = path.with_name(path.name + "-wal")
        return "unfinished" if not (wal.exists() and wal.stat().st_size > 0) else "catalog"
    if head != SQLITE_MAGIC:
        return "foreign: not an SQLite database"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return "catalog"          # let the real open report what is wrong with it
    if not names:
        return "unfinished"
    if "meta" in names and "adapters" in names:
        return "catalog"
    return "foreign: an SQLite database with other tables"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_unfinished(folder: Path, name: str) -> None:
    """Delete temp catalogs left by creators that were killed (their pid is gone)."""
    for p in folder.glob(f".{name}{_CREATING}*"):
        try:
            pid = int(p.name.rsplit(_CREATING, 1)[1].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            p.unlink(missing_ok=True)


def create_atomic(path: Path, meta: dict[str, Any] | None = None, replace: bool = False) -> bool:
    """Build a complete catalog under a temp name and move it to ``path`` in one step, so ``path``
    either does not exist or is a finished catalog, whenever the process is killed.

    The temp file is made in WAL mode and checkpointed on close, so it is published whole in one
    file whose header already says WAL: the first writable open has nothing to convert (a kill
    while switching a rollback-journal file to WAL leaves a hot journal that read-only openers
    cannot roll back). ``link`` publishes it only if ``path`` does not exist (two concurrent creators:
    one wins, the other returns False and opens the winner's). ``replace=True`` (caller holds the
    writer lock and has classified ``path`` as unfinished) renames over it instead.
    """
    clean_unfinished(path.parent, path.name)
    tmp = path.with_name(f".{path.name}{_CREATING}{os.getpid()}-{time.monotonic_ns()}")
    try:
        cat = Catalog.create(tmp, meta)
        cat.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        cat.close()                                   # last connection: the -wal file is removed
        if tmp.with_name(tmp.name + "-wal").exists():
            raise OSError(f"{tmp}: SQLite kept a WAL after close; not publishing it")
        _fsync(tmp)
        if replace:
            for side in ("-wal", "-shm"):          # of the unfinished file: never replay them onto ours
                path.with_name(path.name + side).unlink(missing_ok=True)
            os.replace(tmp, path)
            published = True
        else:
            try:
                os.link(tmp, path)
                published = True
            except FileExistsError:
                published = False
        _fsync(path.parent)
        return published
    finally:
        for leftover in (tmp, *(tmp.with_name(tmp.name + side) for side in ("-journal", "-wal", "-shm"))):
            leftover.unlink(missing_ok=True)
