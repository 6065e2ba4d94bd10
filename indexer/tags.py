"""Labels attached to indexed adapters, in the catalog's SQLite file (a table of its own); on the
Milvus store, which has no catalog, in ``tags.sqlite`` beside it (``indexer/side_tags.py``).

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
from contextlib import contextmanager

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


def _side(index):
    """The side table of a store without a catalog (Milvus), or None for the faiss store."""
    if getattr(index, "catalog", None) is not None:
        return None
    side = getattr(index, "side_tags", None)
    if side is None:
        raise UnavailableError(f"{getattr(index, 'root', 'this index')}: this store keeps no labels")
    return side


@contextmanager
def _writing(index, lock_timeout):
    """The writer lock and one transaction on the table's connection (created on first use)."""
    side = _side(index)
    with index.writer(lock_timeout):
        if side is None:
            with index.catalog.write():
                _ensure(index.catalog.conn)
                yield index.catalog.conn
        else:
            with side.write() as conn:
                _ensure(conn, trigger=False)
                yield conn


def _ensure(conn: sqlite3.Connection, trigger: bool = True) -> None:
    for statement in _SCHEMA if trigger else _SCHEMA[:2]:
        conn.execute(statement)


def _existing(index, ids: list[int]) -> set[int]:
    """The ids among ``ids`` that the store holds (labels of removed ids are never shown)."""
    return set(index.get_many(ids)) if ids else set()


def add(index, pairs: list[tuple[int, str]], lock_timeout: float | None = None) -> int:
    """Attach ``(adapter id, label)`` pairs (already attached ones are kept once); returns how many
    were new. Ids that are not in the catalog are ignored (callers resolve ids first)."""
    pairs = [(int(i), check_label(lab)) for i, lab in pairs]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    side = _side(index)
    with _writing(index, lock_timeout) as conn:
        before = conn.total_changes
        if side is None:
            conn.executemany("INSERT OR IGNORE INTO tags(adapter_id, label, added_at) "
                             "SELECT id, ?, ? FROM adapters WHERE id = ?", [(lab, now, i) for i, lab in pairs])
        else:                       # under the writer lock: no id can be removed meanwhile
            known = _existing(index, sorted({i for i, _l in pairs}))
            conn.executemany("INSERT OR IGNORE INTO tags(adapter_id, label, added_at) VALUES (?, ?, ?)",
                             [(i, lab, now) for i, lab in pairs if i in known])
        return conn.total_changes - before


def remove(index, adapter_id: int, labels: list[str] | None = None, lock_timeout: float | None = None) -> int:
    """Detach ``labels`` (all of them when None) from one adapter; returns how many were removed."""
    with _writing(index, lock_timeout) as conn:
        if labels is None:
            cur = conn.execute("DELETE FROM tags WHERE adapter_id = ?", (int(adapter_id),))
            return cur.rowcount
        return sum(conn.execute("DELETE FROM tags WHERE adapter_id = ? AND label = ?",
                                (int(adapter_id), check_label(lab))).rowcount for lab in labels)


def _select(index, sql: str, args: tuple = ()) -> list[tuple]:
    side = _side(index) if getattr(index, "catalog", None) is None and hasattr(index, "side_tags") else None
    if side is None and getattr(index, "catalog", None) is None:
        return []                                      # a store that keeps no labels
    conn = index.catalog.conn if side is None else side.conn(write=False)
    if conn is None:
        return []                                      # no label was ever attached in this index
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []                                  # no label was ever attached in this index
        raise


def _live(index, rows: list[tuple]) -> list[tuple]:
    """Rows ``(adapter_id, …)`` of ids the store still holds: on Milvus a crash between deleting a
    row and dropping its labels leaves orphans, which are never shown (faiss: a trigger)."""
    if getattr(index, "catalog", None) is not None or not rows:
        return rows
    keep = _existing(index, sorted({int(r[0]) for r in rows}))
    return [r for r in rows if int(r[0]) in keep]


def labelled(index, family: str | None = None) -> dict[int, list[str]]:
    """``{adapter id: [labels, sorted]}`` for every labelled adapter (of ``family`` if given)."""
    if getattr(index, "catalog", None) is None:        # Milvus: the family comes from the collection
        rows = _select(index, "SELECT adapter_id, label FROM tags ORDER BY adapter_id, label")
        recs = index.get_many(sorted({int(r[0]) for r in rows})) if rows else {}
        rows = [r for r in rows if int(r[0]) in recs and (family is None or recs[int(r[0])]["family"] == family)]
    elif family is None:
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
        for i, lab in _live(index, _select(index, f"SELECT adapter_id, label FROM tags WHERE adapter_id IN ({marks}) "
                                                  "ORDER BY adapter_id, label", tuple(chunk))):
            out.setdefault(int(i), []).append(lab)
    return out


def counts(index) -> dict[str, int]:
    """``{label: number of adapters}``."""
    if getattr(index, "catalog", None) is None:        # Milvus: count live ids only
        out: dict[str, int] = {}
        for _i, lab in _live(index, _select(index, "SELECT adapter_id, label FROM tags ORDER BY label")):
            out[lab] = out.get(lab, 0) + 1
        return out
    return dict(_select(index, "SELECT label, COUNT(*) FROM tags GROUP BY label ORDER BY label"))
