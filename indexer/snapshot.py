"""FAISS snapshots: one index file per family, rebuildable from the catalog.

The index in a file is ``IndexIDMap2(IndexFlatIP(dim))`` by default, or the type of the
index's faiss factory string (see ``factory.py``).

A snapshot's file name carries the catalog generation it reflects
(``faiss/<family>.g<generation>.faiss``, the family's *base*); the catalog rows and tombstones
newer than it are replayed on load (``segments.py``), and the result is validated against the
catalog: a missing, unreadable or inconsistent file is simply rebuilt from the embeddings in
the catalog. Files are written to a temp
name, fsynced and ``os.replace``d, so a reader that already opened (or mmapped) the old
file keeps a valid view, and a crash never leaves a half-written snapshot under the real name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote

import faiss
import numpy as np

from . import factory as kinds

SAMPLE_CHECK = 16   # vectors compared against the catalog when a snapshot is loaded

# FAISS 1.15.1 picks its per-pair SIMD kernel over BLAS while nq·dim < distance_compute_blas_threshold
# (measured: the switch moves with dim), default 128000, so a batch of 200 512-d queries never
# uses BLAS. On a 2-core AVX2 EPYC, 100k x 512, 1 thread: 200 queries 5.8 s by SIMD, 0.75 s by
# BLAS; one query 39 ms by SIMD, 80-110 ms by BLAS; crossover about 3-4 queries.
BLAS_MIN_QUERIES = 4


def tune_blas(dim: int) -> None:
    """Batches of >= BLAS_MIN_QUERIES queries go through BLAS, smaller ones through SIMD (process-wide knob)."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES * int(dim)


def file_stem(family: str) -> str:
    """A filesystem-safe, reversible-enough name for a family (``sd1``, ``llama-7b`` stay as they are)."""
    return quote(family, safe="-_.+") if family and family not in (".", "..") else f"%{family.encode().hex()}"


def snapshot_path(folder: Path, family: str, generation: int) -> Path:
    return folder / f"{file_stem(family)}.g{int(generation)}.faiss"


def build(dim: int, ids: np.ndarray, vectors: np.ndarray, factory: str = kinds.FLAT):
    """A fresh inner-product index holding ``vectors`` under ``ids`` (ids must be unique):
    exact flat, or ``factory``'s type once the family is big enough to train it."""
    return kinds.build(dim, ids, vectors, factory)


def index_ids(index) -> np.ndarray:
    return kinds.ids_of(index)


def read(path: Path, dim: int, mmap: bool = False, factory: str = kinds.FLAT):
    """Read a base file and check its type and dim; returns ``(index, None)`` or ``(None, reason)``.
    ``mmap`` is for processes that will never mutate the index (FAISS aborts on add to an
    mmapped index)."""
    if not path.exists():
        return None, "missing"
    try:
        flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
        index = faiss.read_index(str(path), flags)
    except (RuntimeError, MemoryError) as e:
        return None, f"unreadable ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
    if index.d != dim:
        return None, f"dim {index.d} != catalog dim {dim}"
    if not kinds.matches(index, factory, dim):
        return None, f"wrong index type {type(index).__name__} for factory {factory}"
    return index, None


def validate(index, expected_ids: np.ndarray, embeddings_of, factory: str = kinds.FLAT) -> str | None:
    """None if ``index`` (a base with the catalog's deltas replayed) matches the catalog, else why not.

    Cheap but catches what matters: exactly the catalog's ids (FAISS silently accepts duplicates,
    so ntotal alone is not enough), and a sample of vectors byte-identical to the catalog's
    embeddings (for types that store vectors exactly). A flat fallback of a factory index big
    enough to be trained is reported as stale. ``embeddings_of(ids) -> {id: bytes}``.
    """
    if kinds.is_fallback(index, factory) and len(expected_ids) >= kinds.min_train(factory, index.d):
        return f"flat fallback but {len(expected_ids)} vectors are enough to train {factory}"
    if index.ntotal != len(expected_ids):
        return f"ntotal {index.ntotal} != catalog count {len(expected_ids)}"
    if not np.array_equal(np.sort(index_ids(index)), expected_ids):
        return "ids differ from the catalog"
    if len(expected_ids) and kinds.stores_exact(index):
        sample = expected_ids[np.linspace(0, len(expected_ids) - 1, min(SAMPLE_CHECK, len(expected_ids))).astype(int)]
        stored = embeddings_of(sample)
        for i in sample:
            if index.reconstruct(int(i)).tobytes() != stored[int(i)]:
                return f"vector of id {int(i)} differs from the catalog"
    return None


def load(path: Path, dim: int, expected_ids: np.ndarray, embeddings_of, mmap: bool = False,
         factory: str = kinds.FLAT):
    """``read`` + ``validate`` of a whole snapshot (no deltas): ``(index, None)`` or ``(None, reason)``."""
    index, reason = read(path, dim, mmap, factory)
    if index is not None:
        reason = validate(index, expected_ids, embeddings_of, factory)
    return (index, None) if reason is None else (None, reason)


def write(index, path: Path) -> int:
    """Atomically (temp file, fsync, rename, fsync dir) write ``index`` to ``path``; returns its size."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        faiss.write_index(index, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        size = tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return size


_NAME = re.compile(r"(?P<stem>.+)\.g(?P<gen>\d+)\.faiss")


def prune(folder: Path, current: dict[str, int]) -> list[Path]:
    """Delete snapshot files that are not the current generation of a live family, and stray temps.

    Only the lock holder calls this, so a temp file here is a leftover of a crashed writer.
    Unlinking is safe for readers that already opened or mmapped a file.
    """
    keep = {snapshot_path(folder, fam, gen).name for fam, gen in current.items()}
    removed = []
    for p in folder.iterdir():
        if p.name in keep:
            continue
        if _NAME.fullmatch(p.name) or (p.name.startswith(".") and ".faiss.tmp-" in p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
