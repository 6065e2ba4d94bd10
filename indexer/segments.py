"""Base snapshot + catalog deltas: how a write stays O(1) in the index size.

A family's vectors live in one FAISS *base* file, written at generation ``base``. Every later
write only commits rows (stamped with their generation) and tombstones to the catalog; the
catalog *is* the append-only segment. Opening a family reads the base and replays what is newer:
remove every id that was tombstoned or rewritten since ``base``, then add the rows written since.
When that delta grows past ``COMPACT_FRACTION`` of the base, the writer writes a new base
(compaction: O(N), amortized to a constant number of vectors per write, reported separately).

Hand-written because FAISS has no log-structured persistence of its own (``OnDiskInvertedLists``
covers IVF lists only, and the catalog already holds every vector durably).
"""
from __future__ import annotations

import numpy as np

COMPACT_FRACTION = 0.1   # rewrite the base once the delta exceeds 10 % of it (amortized: 10 vectors/write)


def needs_compaction(delta: int, base_n: int) -> bool:
    """``base_n < 0`` is a legacy (schema-1, read-only) catalog: nothing to compact there."""
    return base_n >= 0 and delta > 0 and delta > COMPACT_FRACTION * base_n


def replay(index, removed: np.ndarray, changed_ids: np.ndarray, changed_vecs: np.ndarray) -> int | None:
    """Bring ``index`` (a base) up to date in place: drop ``removed`` and ``changed_ids``, add the
    changed rows. Returns how many stored vectors were dropped (0: only appends happened), or None
    when the index type cannot remove ids (HNSW): rebuild it instead."""
    gone = np.union1d(removed, changed_ids).astype(np.int64)
    dropped = 0
    if len(gone) and index.ntotal:
        try:
            dropped = int(index.remove_ids(np.ascontiguousarray(gone)))
        except RuntimeError:        # FAISS refuses before touching anything
            return None
    if len(changed_ids):
        index.add_with_ids(np.ascontiguousarray(changed_vecs, dtype=np.float32),
                           np.ascontiguousarray(changed_ids, dtype=np.int64))
    return dropped
