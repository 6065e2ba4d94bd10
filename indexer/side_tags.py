"""Labels beside a store that has no SQLite catalog (Milvus): ``tags.sqlite`` in the index folder.

The same table as the faiss store's catalog holds (adapter id, label, added_at), WAL mode, one
transaction per write. Milvus has no triggers, so ``MilvusStore.remove`` drops the labels of the
ids it deletes (after the delete: a crash in between leaves labels of an id that no longer
exists, which every read filters out against the collection, never a label on the wrong adapter —
ids are never reused). Unlike the re-rank records beside it, labels are data: an unreadable file
is an error, not something to work around.
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from lorasearch.errors import UnavailableError

FILE = "tags.sqlite"


class SideTags:
    def __init__(self, root: Path, readonly: bool):
        self.path = Path(root) / FILE
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None
        self._mutex = threading.RLock()

    def conn(self, write: bool = False) -> sqlite3.Connection | None:
        """The connection (None when reading and no label was ever written)."""
        with self._mutex:
            if self._conn is None:
                if not self.path.exists() and (self.readonly or not write):
                    return None
                try:
                    uri = f"file:{self.path}?mode={'ro' if self.readonly else 'rwc'}"
                    self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
                    if not self.readonly:
                        self._conn.execute("PRAGMA journal_mode=WAL")
                except sqlite3.Error as e:
                    raise UnavailableError(f"{self.path}: labels cannot be opened ({e})") from None
            return self._conn

    @contextmanager
    def write(self):
        conn = self.conn(write=True)
        with self._mutex, conn:          # one transaction: committed on exit, rolled back on error
            yield conn

    def drop(self, ids) -> None:
        conn = self.conn(write=False)
        if conn is None or not ids:
            return
        with self._mutex, conn:
            try:
                conn.executemany("DELETE FROM tags WHERE adapter_id = ?", [(int(i),) for i in ids])
            except sqlite3.OperationalError as e:
                if "no such table" not in str(e):
                    raise

    def close(self) -> None:
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
