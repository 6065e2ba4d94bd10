"""Labels attached to indexed adapters, in the catalog's SQLite file (a table of its own).

The table is created on first use (an index built before it simply has no labels), keyed by
adapter id with any number of labels per adapter (``nsfw``, a style, a task …). An
``AFTER DELETE`` trigger on ``adapters`` drops an adapter's labels with it, in the same
transaction, so removal, pruning and re-indexing need no code here; an upsert of a known path
keeps its id and therefore its labels. Writes take the index's writer lock and one catalog
transaction; reads never block (WAL) and see no labels when the table does not exist yet.
"""
from __future__ import annotations

import sqlite3
import time

from lorasearch.errors import UnavailableError, UsageError

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tags (adapter_id INTEGER NOT NULL, label TEXT NOT NULL, "
    "added_at TEXT NOT NULL, PRIMARY KEY (adapter_id, label))",
    "CREATE INDEX IF NOT EXISTS tags_label ON tags(label)",
    "CREATE TRIGGER IF NOT EXISTS tags_follow_adapter AFTER DELETE ON adapters "
    "BEGIN DELETE FROM tags WHERE adapter_id = OLD.id; END",
)
MAX_LABEL = 200


def check_label(label: str) -> str:
    """A label is one line of printable text, at most 200 characters, surrounding spaces dropped."""
    text = str(label).strip()
    if not text:
        raise UsageError("a label cannot be empty")
    if len(text) > MAX_LABEL:
        raise UsageError(f"label {text[:40]!r}… is longer than {MAX_LABEL} characters")
    if any(not ch.isprintable() for ch in text):
        raise UsageError(f"label {text[:40]!r} contains control characters")
    return text


def _writable(index) -> None:
    if getattr(index, "catalog", None) is None:
        raise UnavailableError(f"{getattr(index, 'root', 'this index')}: labels are kept in the faiss store's "
                               "SQLite catalog; this store has none")


def _ensure(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        conn.execute(statement)


def add(index, pairs: list[tuple[int, str]], lock_timeout: float | None = None) -> int:
    """Attach ``(adapter id, label)`` pairs (already attached ones are kept once); returns how many
    were new. Ids that are not in the catalog are ignored (callers resolve ids first)."""
    pairs = [(int(i), check_label(lab)) for i, lab in pairs]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _writable(index)
    with index.writer(lock_timeout), index.catalog.write():
        conn = index.catalog.conn
        _ensure(conn)
        before = conn.total_changes
        conn.executemany("INSERT OR IGNORE INTO tags(adapter_id, label, added_at) "
                         "SELECT id, ?, ? FROM adapters WHERE id = ?", [(lab, now, i) for i, lab in pairs])
        return conn.total_changes - before


def remove(index, adapter_id: int, labels: list[str] | None = None, lock_timeout: float | None = None) -> int:
    """Detach ``labels`` (all of them when None) from one adapter; returns how many were removed."""
    _writable(index)
    with index.writer(lock_timeout), index.catalog.write():
        conn = index.catalog.conn
        _ensure(conn)
        if labels is None:
            cur = conn.execute("DELETE FROM tags WHERE adapter_id = ?", (int(adapter_id),))
            return cur.rowcount
        return sum(conn.execute("DELETE FROM tags WHERE adapter_id = ? AND label = ?",
                                (int(adapter_id), check_label(lab))).rowcount for lab in labels)


def _select(index, sql: str, args: tuple = ()) -> list[tuple]:
    if getattr(index, "catalog", None) is None:
        return []                                      # a store without the SQLite catalog has no labels
    try:
        return index.catalog.conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []                                  # no label was ever attached in this index
        raise


def labelled(index, family: str | None = None) -> dict[int, list[str]]:
    """``{adapter id: [labels, sorted]}`` for every labelled adapter (of ``family`` if given)."""
    if family is None:
        rows = _select(index, "SELECT adapter_id, label FROM tags ORDER BY adapter_id, label")
    else:
        rows = _select(index, "SELECT t.adapter_id, t.label FROM tags t JOIN adapters a ON a.id = t.adapter_id "
                              "WHERE a.family = ? ORDER BY t.adapter_id, t.label", (family,))
    out: dict[int, list[str]] = {}
    for i, lab in rows:
        out.setdefault(int(i), []).append(lab)
    return out


def labels_of(index, ids) -> dict[int, list[str]]:
    """Labels of the given ids (ids without labels are absent) — for ``info`` / ``query`` output."""
    ids = [int(i) for i in ids]
    out: dict[int, list[str]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        for i, lab in _select(index, f"SELECT adapter_id, label FROM tags WHERE adapter_id IN ({marks}) "
                                     "ORDER BY adapter_id, label", tuple(chunk)):
            out.setdefault(int(i), []).append(lab)
    return out


def counts(index) -> dict[str, int]:
    """``{label: number of adapters}``."""
    return dict(_select(index, "SELECT label, COUNT(*) FROM tags GROUP BY label ORDER BY label"))
