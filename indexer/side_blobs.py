"""Re-rank records beside a store that cannot hold MiB-sized values (Milvus: VARCHAR ≤ 65,535 bytes).

One SQLite file in the index folder, keyed by the adapter's sha256: a record is a function of
the file's bytes only, so a blob can never describe another version of a row — a crash between
writing blobs and the store's upsert leaves at worst an unused blob, never a wrong one (blobs are
written first). Removing the last row of a sha256 drops its blob. A record is an optimization:
if this file cannot be read or written (corrupt, full disk) the store works on without it and a
query re-reads those candidates' files, as for an index built before records.
"""
from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger("lorasearch.indexer")

FILE = "rerank.sqlite"
_CHUNK = 500


class SideBlobs:
    def __init__(self, root: Path, readonly: bool):
        self.path = Path(root) / FILE
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None

    def _db(self, write: bool) -> sqlite3.Connection | None:
        if self._conn is None:
            if not self.path.exists() and (self.readonly or not write):
                return None
            uri = f"file:{self.path}?mode={'ro' if self.readonly else 'rwc'}"
            self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            if not self.readonly:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("CREATE TABLE IF NOT EXISTS rerank (sha256 TEXT PRIMARY KEY, blob BLOB NOT NULL)")
                self._conn.commit()
        return self._conn

    def put(self, blobs: dict[str, bytes]) -> None:
        if not blobs:
            return
        try:
            db = self._db(write=True)
            with db:
                db.executemany("INSERT OR REPLACE INTO rerank(sha256, blob) VALUES (?, ?)", list(blobs.items()))
        except sqlite3.Error as e:
            log.warning("%s: re-rank records not stored (%s); queries re-read those files", self.path, e)

    def get(self, shas: list[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        try:
            db = self._db(write=False)
            if db is None or not shas:
                return out
            shas = sorted(set(shas))
            for i in range(0, len(shas), _CHUNK):
                chunk = shas[i:i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                out.update(db.execute(f"SELECT sha256, blob FROM rerank WHERE sha256 IN ({marks})", chunk))
        except sqlite3.Error:
            return {}   # unreadable side file: candidates are re-scored from their files
        return out

    def drop(self, shas: list[str]) -> None:
        try:
            db = self._db(write=False)
            if db is not None and shas:
                with db:
                    db.executemany("DELETE FROM rerank WHERE sha256 = ?", [(s,) for s in shas])
        except sqlite3.Error as e:   # an orphan blob is harmless (keyed by content)
            log.warning("%s: re-rank records of removed adapters not dropped (%s)", self.path, e)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
