"""``LoraIndex``: the vector store behind lorasearch (catalog + per-family FAISS snapshots + GPU copy).

An index is a directory::

    catalog.sqlite          SQLite/WAL, the source of truth (records *and* embeddings)
    faiss/<family>.g<N>.faiss   IndexIDMap2(IndexFlatIP(dim)) per family, a rebuildable base snapshot
                                (or the type of the faiss factory string fixed at creation)
    writer.lock             flock held by the one writer (its pid inside)

Guarantees:
- Nothing acknowledged is lost: ``upsert``/``remove`` return only after their SQLite transaction
  committed. A write costs O(1) in the index size: it commits rows stamped with their generation
  (and tombstones); the FAISS base file is not rewritten. Readers load the base and replay what
  the catalog holds beyond it (``segments.py``); the writer rewrites a base only when that delta
  passes a fraction of it (compaction). A missing, stale or damaged base is rebuilt from the catalog.
- Creating an index is atomic: ``catalog.sqlite`` appears complete or not at all; an unfinished
  one (0 bytes, from an older lorasearch killed while creating) is re-created; a file that is not
  a catalog is refused, never overwritten.
- One writer at a time across processes (``IndexLockedError`` names the holder's pid);
  readers never take the lock and never wait for it.
- Families are separate spaces: a query is only ever compared with adapters of its family.
- Ids are int64, assigned once per path and never reused: upserting an existing path keeps its
  id (and ``added_at``); removing a path and adding it again gives a new id.
- Scores are cosine similarities: stored and query vectors are L2-normalized (a zero vector
  stays zero and scores 0 against everything).
- Search is exact unless the index was created with a faiss factory string (e.g.
  ``"IVF1024,Flat"``, ``"HNSW32"``): then each family large enough to train it is searched
  approximately, with ``nprobe`` / ``ef_search`` per open or per search (``factory.py``).

Within one process the object is thread-safe (calls are serialized); use one object per thread
for parallel CPU searches if that ever matters.
"""
from __future__ import annotations

import numbers
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import faiss
import numpy as np

from lorasearch.errors import (IncompatibleError, IndexLockedError, MissingError, UsageError)

from . import factory as kinds
from . import snapshot
from . import catalog as catalog_mod
from . import segments
from .catalog import Catalog
from .gpu import GPU_MAX_K, GpuMirror, resolve_device
from .base import RecordedEncoderMixin, checked_records, resolve_path
from .lock import LockedWriterMixin, WriterLock

CATALOG_FILE = "catalog.sqlite"
SNAPSHOT_DIR = "faiss"
LOCK_FILE = "writer.lock"
_resolve = resolve_path   # the catalog key


class LoraIndex(LockedWriterMixin, RecordedEncoderMixin):
    """Open with ``LoraIndex.open(path, create=..., readonly=..., device=...)``."""

    def __init__(self, root: Path, catalog: Catalog, readonly: bool, gpu_ordinal: int | None, lock_timeout: float,
                 factory: str = kinds.FLAT, nprobe: int | None = None, ef_search: int | None = None):
        self.root = root
        self.factory = factory
        self.nprobe = nprobe
        self.ef_search = ef_search
        self._min_train: int | None = None
        self._removable: bool | None = None
        self._stale: set[str] = set()             # families whose cached index must be rebuilt from the catalog
        self.catalog = catalog
        self.readonly = readonly
        self.lock_timeout = lock_timeout
        self.repairs: dict[str, str] = {}        # family -> why its snapshot had to be rebuilt
        self._lock = WriterLock(root / LOCK_FILE, label=str(root))
        self._lock_depth = 0
        self._deferred = 0                        # > 0 inside writer(): snapshots wait for flush()
        self._mutex = threading.RLock()
        self._cache: dict[str, tuple[int, object]] = {}   # family -> (generation, CPU index)
        self._unsaved: set[str] = set()           # families whose cached index must become their base file
        self._epoch: dict[str, int] = {}          # family -> changes when its cached index is replaced or shrinks
        self._mapped: set[str] = set()            # families whose cached index is mmapped (never mutated)
        self._pending: set[str] = set()           # families written inside writer(), checked at its end
        self.compactions: dict[str, dict] = {}    # family -> the last base written (vectors, bytes, seconds)
        self._encoder: dict | None = None
        self._gpu = GpuMirror(gpu_ordinal) if gpu_ordinal is not None else None

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike = ".lorasearch", create: bool = False, readonly: bool = False,
             device: str = "auto", lock_timeout: float = 0.0, factory: str | None = None,
             nprobe: int | None = None, ef_search: int | None = None) -> "LoraIndex":
        """Open the index directory ``path``; ``create`` makes it if missing.

        ``factory``: a FAISS index-factory string (``"IVF1024,Flat"``, ``"HNSW32"``) fixed
        when the index is created (``None``/``"Flat"``: exact search); reopening with a
        different one raises ``IncompatibleError``, ``None`` means "whatever it was created
        with". ``nprobe`` / ``ef_search``: IVF / HNSW search breadth for this session
        (default: recorded at creation, else ``factory.DEFAULT_NPROBE`` / ``DEFAULT_EF_SEARCH``).

        ``readonly`` never writes anything (snapshots are memory-mapped, repairs stay in memory).
        ``device``: ``auto`` uses a GPU search copy when FAISS has one, ``cuda`` insists
        (``UnavailableError`` otherwise), ``cpu`` never does. ``lock_timeout``: seconds a
        write waits for another writer before ``IndexLockedError``.
        """
        root = Path(path).expanduser().resolve()
        if create and readonly:
            raise UsageError(f"{root}: cannot create an index read-only")
        gpu_ordinal = resolve_device(device)
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (not isinstance(value, numbers.Integral) or value < 1):
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        asked = None if factory is None else kinds.normalize(factory)
        catalog_path = root / CATALOG_FILE
        if asked is not None:
            kinds.validate(asked)
        catalog = cls._open_or_create(root, catalog_path, create, readonly,
                                      {"faiss_factory": asked or kinds.FLAT, "nprobe": nprobe, "ef_search": ef_search})
        try:
            catalog.check_schema()
            recorded = catalog.meta("faiss_factory") or kinds.FLAT   # indexes made before the option: flat
            kinds.check_pinned(str(root), recorded, asked)
            nprobe = nprobe or int(catalog.meta("nprobe") or kinds.DEFAULT_NPROBE)
            ef_search = ef_search or int(catalog.meta("ef_search") or kinds.DEFAULT_EF_SEARCH)
        except Exception:
            catalog.close()
            raise
        if not readonly:
            (root / SNAPSHOT_DIR).mkdir(exist_ok=True)
        return cls(root, catalog, readonly, gpu_ordinal, lock_timeout, recorded, nprobe, ef_search)

    @classmethod
    def _open_or_create(cls, root: Path, catalog_path: Path, create: bool, readonly: bool, meta: dict) -> Catalog:
        """Open the catalog, creating it atomically if asked (see ``catalog.create_atomic``)."""
        if catalog_path.exists() or catalog_path.is_symlink():
            kind = "catalog" if not catalog_path.is_file() else catalog_mod.classify(catalog_path)
            if kind.startswith("foreign"):
                raise IncompatibleError(f"{catalog_path}: not a lorasearch catalog ({kind.split(': ', 1)[1]}); "
                                        "refusing to use or overwrite it, point --index elsewhere")
            if kind == "catalog":
                return cls._open_existing(catalog_path, readonly)
            if not create:          # unfinished: only a writer that was asked to create may finish it
                raise MissingError(f"{root}: the index was never finished being created (empty {CATALOG_FILE}); "
                                   "run `lorasearch index DIR` to create it again")
        elif not create:
            raise MissingError(f"{root}: no lorasearch index here (no {CATALOG_FILE}); "
                               "build one with `lorasearch index DIR` or point --index at one")
        if readonly:
            raise UsageError(f"{root}: cannot create an index read-only")
        if root.exists() and not root.is_dir():
            raise UsageError(f"{root}: exists and is not a directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not catalog_path.exists():
                catalog_mod.create_atomic(catalog_path, meta)     # False: a concurrent creator won
            else:
                with WriterLock(root / LOCK_FILE, label=str(root)) as lock:
                    lock.label = str(root)
                    if catalog_mod.classify(catalog_path) == "unfinished":   # still, now that we hold the lock
                        catalog_mod.create_atomic(catalog_path, meta, replace=True)
        except (OSError, sqlite3.Error) as e:
            raise MissingError(f"{root}: cannot create an index here ({getattr(e, 'strerror', None) or e})") from None
        return cls._open_existing(catalog_path, readonly)

    @staticmethod
    def _open_existing(catalog_path: Path, readonly: bool) -> Catalog:
        """Open a catalog file; if it has no schema yet and was just created (by an older lorasearch
        that did not create atomically), wait a little for its schema transaction instead of failing."""
        deadline = time.monotonic() + 5.0
        while True:
            catalog = Catalog(catalog_path, readonly=readonly)
            try:
                catalog.check_schema()
                return catalog
            except IncompatibleError as e:
                catalog.close()
                young = time.time() - catalog_path.stat().st_mtime < 30
                if "no such table" not in str(e) or not young or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        with self._mutex:
            if self._lock_depth:
                self._deferred = 0
                try:
                    self.flush()
                finally:
                    self._lock_depth = 0
                    self._lock.release()
            if self._gpu is not None:
                self._gpu.close()
                self._gpu = None
            self._cache.clear()
            self.catalog.close()

    def __enter__(self) -> "LoraIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraIndex({str(self.root)!r}, readonly={self.readonly})"

    # -- encoder ------------------------------------------------------------------------
    @property
    def encoder(self) -> dict | None:
        """``{"spec", "version", "dim"}`` of the encoder that built this index, or None if empty."""
        if self._encoder is None:            # set once by the first writer, never changes after
            with self._mutex, self.catalog.read():
                spec = self.catalog.meta("encoder_spec")
                if spec is not None:
                    self._encoder = {"spec": spec, "version": self.catalog.meta("encoder_version"),
                                     "dim": int(self.catalog.meta("dim"))}
        return None if self._encoder is None else dict(self._encoder)

    def _record_encoder(self, spec: str, version: str, dim: int) -> None:
        kinds.validate(self.factory, dim)     # refuse before anything is recorded
        with self._mutex, self._writing(), self.catalog.write():
            if self.catalog.meta("encoder_spec") is None:
                self.catalog.set_meta("encoder_spec", spec)
                self.catalog.set_meta("encoder_version", version)
                self.catalog.set_meta("dim", dim)

    # -- locking ------------------------------------------------------------------------

    @contextmanager
    def writer(self, timeout: float | None = None) -> Iterator["LoraIndex"]:
        """Hold the writer lock across many ``upsert``/``remove`` calls and write snapshots once, on exit.

        Every call still commits its own catalog transaction (acknowledged = durable); only the
        FAISS snapshot files wait for ``flush()`` or the end of the block (even on error).
        """
        with self._mutex:
            self._acquire(timeout)
            self._deferred += 1
        try:
            yield self
        finally:
            with self._mutex:
                self._deferred -= 1
                try:
                    if self._deferred == 0:
                        pending, self._pending = self._pending, set()
                        self.flush(pending)
                finally:
                    self._release()

    # -- snapshots ----------------------------------------------------------------------
    def _snapshot_path(self, family: str, generation: int) -> Path:
        return snapshot.snapshot_path(self.root / SNAPSHOT_DIR, family, generation)

    def _family_generation(self, family: str) -> int | None:
        return self.catalog.family_generations().get(family)

    def _base_path(self, family: str) -> Path | None:
        """The family's base file as the catalog names it now (None: never written, or no family)."""
        state = self.catalog.family_state(family)
        return None if state is None or state[1] == 0 else self._snapshot_path(family, state[1])

    def _family_index(self, family: str):
        """``(index, generation)`` reflecting the catalog now, or ``(None, None)`` for an unknown family.

        A cached index a few generations behind is brought forward by replaying the catalog's
        delta (O(delta)); otherwise the base file is loaded and the delta since it replayed, and
        the result checked against the catalog; a missing or damaged base is rebuilt from the
        catalog's embeddings (and why is recorded in ``repairs``).
        """
        for attempt in range(3):
            with self.catalog.read():
                state = self.catalog.family_state(family)
                if state is None:
                    self._cache.pop(family, None)
                    return None, None
                gen, base, base_n = state
                cached = self._cache.get(family)
                if cached is not None and family not in self._stale:
                    if cached[0] == gen:
                        return cached[1], gen
                    if base <= cached[0] < gen:
                        # a memory-mapped index is read-only: catch up on an owned in-memory copy
                        index = (faiss.deserialize_index(faiss.serialize_index(cached[1])) if family in self._mapped
                                 else cached[1])
                        if self._catch_up(family, index, cached[0]):
                            if family in self._mapped:
                                self._mapped.discard(family)
                                self._new_epoch(family)
                            self._cache[family] = (gen, index)
                            return index, gen
                self._cache.pop(family, None)
                self._mapped.discard(family)
                dim = self._require_dim()
                if family in self._stale or base == 0:   # planned rebuild (HNSW removal, training) or no base yet
                    ids, vectors = self.catalog.family_vectors(family, dim)
                    index = snapshot.build(dim, ids, vectors, self.factory)
                    if family in self._stale or segments.needs_compaction(len(ids), base_n):
                        self._unsaved.add(family)
                    self._stale.discard(family)
                    self._cache[family] = (gen, index)
                    self._new_epoch(family)
                    return index, gen
                delta = self.catalog.delta_size(family, base)
                mmap = self.readonly and delta == 0
                index, reason = snapshot.read(self._snapshot_path(family, base), dim, mmap=mmap, factory=self.factory)
                if index is not None and delta and not self._catch_up(family, index, base):
                    self._stale.add(family)     # cannot replay removals (HNSW) or due for training: planned
                    continue                    # rebuild, on the next pass (not a repair)
                if index is not None and reason is None:
                    reason = snapshot.validate(index, self.catalog.family_ids(family), self.catalog.embeddings,
                                               self.factory)
                    if reason is None and segments.needs_compaction(delta, base_n):
                        self._unsaved.add(family)        # persisted by the next writer / _save_repairs
                # a missing file may mean a writer just replaced it: look again once, in a fresh transaction
                if reason is None or reason != "missing" or attempt >= 1 or self._lock_depth:
                    if reason is not None:
                        ids, vectors = self.catalog.family_vectors(family, dim)
                        index = snapshot.build(dim, ids, vectors, self.factory)
                        self.repairs[family] = reason
                        self._unsaved.add(family)
                    elif mmap:
                        self._mapped.add(family)
                    self._cache[family] = (gen, index)
                    self._new_epoch(family)
                    return index, gen
        raise AssertionError("unreachable")

    def _catch_up(self, family: str, index, since: int) -> bool:
        """Replay the catalog's changes to ``family`` after generation ``since`` into ``index`` (inside a
        read transaction). False when it cannot (the type cannot remove, or a factory index is now
        due for training): the caller rebuilds."""
        dim = self._require_dim()
        ids, vectors = self.catalog.changed_since(family, since, dim)
        dropped = segments.replay(index, self.catalog.removed_since(family, since), ids, vectors)
        if dropped is None:
            return False
        if dropped:
            self._new_epoch(family)                 # removals shift the vectors: a GPU copy re-uploads
        if len(ids) and kinds.is_fallback(index, self.factory) and index.ntotal >= self._train_min(dim):
            self._stale.add(family)                 # enough vectors now: train the factory type
            return False
        return True

    def _new_epoch(self, family: str) -> None:
        self._epoch[family] = self._epoch.get(family, 0) + 1

    def _save_repairs(self) -> None:
        """Persist rebuilt snapshots and due compactions found by a reader, if no writer is busy
        (never waits for the lock)."""
        if self.readonly or not self._unsaved or self._deferred:
            return
        with self._mutex:
            try:
                self._acquire(timeout=0)
            except IndexLockedError:
                return          # the active writer will write its own snapshots
            try:
                self.flush()
            finally:
                self._release()

    def flush(self, families: Iterable[str] | None = None) -> None:
        """Make the base files match the catalog where it is due: write bases that were rebuilt,
        are missing, or whose delta passed the compaction fraction; delete files no base names.
        ``families``: only check these for compaction (the ones just written); default all."""
        with self._mutex, self._writing():
            with self.catalog.read():
                states = {f: self.catalog.family_state(f) for f in self.catalog.family_generations()}
            check = set(states) if families is None else set(families)
            for family, (gen, base, base_n) in sorted(states.items()):
                if family in self._unsaved or (base and not self._snapshot_path(family, base).exists()):
                    due = True
                elif family in check:
                    with self.catalog.read():
                        due = segments.needs_compaction(self.catalog.delta_size(family, base), base_n)
                else:
                    due = False
                if due:
                    self._compact(family)
            self._unsaved.clear()
            with self.catalog.read():
                bases = {f: b for f, b in self.catalog.family_bases().items() if b}
            snapshot.prune(self.root / SNAPSHOT_DIR, bases)

    def compact(self) -> dict:
        """Write every family's base at its current generation (delta 0); returns what ``flush`` would
        report: ``{family: {"vectors", "bytes", "seconds"}}`` for the bases written."""
        with self._mutex, self._writing():
            self.compactions.clear()
            with self.catalog.read():
                states = {f: self.catalog.family_state(f) for f in self.catalog.family_generations()}
            for family, (gen, base, _n) in sorted(states.items()):
                if base != gen or not self._snapshot_path(family, base).exists():
                    self._compact(family)
            self._unsaved.clear()
            with self.catalog.read():
                bases = {f: b for f, b in self.catalog.family_bases().items() if b}
            snapshot.prune(self.root / SNAPSHOT_DIR, bases)
            return {f: dict(c) for f, c in self.compactions.items()}

    def _compact(self, family: str) -> None:
        """Write the family's full index as its new base (lock held), then point the catalog at it.
        A kill between the rename and the commit leaves an unnamed file that the next prune deletes."""
        started = time.perf_counter()
        index, at = self._family_index(family)
        if index is None:
            return
        if family in self._mapped:       # never true for a writer (mmap is read-only), kept for safety
            return
        path = self._snapshot_path(family, at)
        snapshot.write(index, path)
        size = path.stat().st_size
        with self.catalog.write():
            state = self.catalog.family_state(family)
            if state is None or state[0] != at:
                return                   # cannot happen under the lock; then the file is simply pruned
            self.catalog.set_base(family, at, int(index.ntotal))
        self._unsaved.discard(family)
        self.compactions[family] = {"vectors": int(index.ntotal), "bytes": int(size),
                                    "seconds": round(time.perf_counter() - started, 6)}

    # -- writes -------------------------------------------------------------------------
    def _prepare(self, records: list[dict], dim: int) -> list[tuple[dict, np.ndarray]]:
        out = []
        for rec, path, family, vec in checked_records(records, dim, self.root):
            blob = rec.get("rerank")
            if blob is not None:
                if not isinstance(blob, (bytes, bytearray, memoryview)):
                    raise UsageError(f"{path}: rerank must be bytes, got {type(blob).__name__}")
                if len(blob) > catalog_mod.RERANK_MAX_BYTES:
                    raise UsageError(f"{path}: rerank record of {len(blob):,} bytes exceeds the "
                                     f"{catalog_mod.RERANK_MAX_BYTES:,}-byte bound")
            out.append((dict(rec, path=path, family=family), vec))
        return out

    def _can_remove(self, dim: int) -> bool:
        """Whether this index type removes ids in place (flat, IVF, PQ...; not HNSW/NSG graphs)."""
        if self._removable is None:
            inner = faiss.downcast_index(faiss.index_factory(int(dim), self.factory, faiss.METRIC_INNER_PRODUCT))
            self._removable = not isinstance(inner, (faiss.IndexHNSW, faiss.IndexNSG))
        return self._removable

    def _train_min(self, dim: int) -> int:
        if self._min_train is None:
            self._min_train = kinds.min_train(self.factory, dim)
        return self._min_train

    def _require_dim(self) -> int:
        dim = self.dim
        if dim is None:
            raise UsageError(f"{self.root}: no encoder recorded yet; call check_encoder(spec, version, dim) first")
        return dim

    def upsert(self, records: Iterable[dict]) -> list[int]:
        """Insert or replace adapters by path, in one transaction; returns their ids in order.

        A record is a dict with ``path``, ``sha256``, ``family``, ``embedding`` (float32 [dim])
        and optionally ``size``, ``mtime_ns``, ``format``, ``ranks``, ``n_modules``,
        ``delta_norm``, ``metadata``, ``info`` (JSON-able) and ``rerank`` (bytes: a compact
        record for exact re-scoring, at most ``catalog.RERANK_MAX_BYTES``; see ``rerank_blobs``).
        """
        records = list(records)
        if not records:
            return []
        with self._mutex, self._writing():
            dim = self._require_dim()
            prepared = self._prepare(records, dim)
            with self.catalog.read():
                previous = self.catalog.families_of_paths([r["path"] for r, _ in prepared])
                touched = {r["family"] for r, _ in prepared} | previous
                before = {f: self._family_generation(f) for f in touched}
            with self.catalog.write():
                gen = self.catalog.next_generation()
                ids, replaced = [], []
                for rec, vec in prepared:
                    adapter_id, old_family = self.catalog.upsert(rec, vec.tobytes(), gen)
                    ids.append(adapter_id)
                    if old_family is not None:
                        replaced.append((adapter_id, old_family))
                self.catalog.bump(touched, gen)
            added = [(i, rec["family"], vec) for i, (rec, vec) in zip(ids, prepared)]
            if replaced and not self._can_remove(dim):   # a base of this type could never replay them
                self._unsaved.update(f for _i, f in replaced)
            self._apply(touched, before, gen, dim, removed=replaced, added=added)
        return ids

    def remove(self, ids_or_paths) -> int:
        """Remove adapters given by id (int) or path (str/Path), in one transaction; returns how many existed."""
        if isinstance(ids_or_paths, (numbers.Integral, str, os.PathLike)):
            ids_or_paths = [ids_or_paths]
        with self._mutex, self._writing():
            with self.catalog.read():
                targets: dict[int, str] = {}
                for item in ids_or_paths:
                    if isinstance(item, numbers.Integral):
                        rec = self.catalog.get(int(item))
                    elif isinstance(item, (str, os.PathLike)):
                        rec = self.catalog.by_path(_resolve(item))
                    else:
                        raise UsageError(f"remove: expected an id or a path, got {item!r}")
                    if rec is not None:
                        targets[rec["id"]] = rec["family"]
                touched = set(targets.values())
                before = {f: self._family_generation(f) for f in touched}
            if not targets:
                return 0
            dim = self._require_dim()
            with self.catalog.write():
                gen = self.catalog.next_generation()
                for adapter_id in targets:
                    self.catalog.delete(adapter_id, gen)
                self.catalog.bump(touched, gen)
            if not self._can_remove(dim):                 # a base of this type could never replay them
                self._unsaved.update(touched)
            self._apply(touched, before, gen, dim, removed=list(targets.items()), added=[])
        return len(targets)

    def touch(self, adapter_id: int, size: int | None = None, mtime_ns: int | None = None) -> bool:
        """Refresh a record's file stat (same bytes, new timestamp); the vector and snapshots are untouched."""
        with self._mutex, self._writing(), self.catalog.write():
            return self.catalog.touch(int(adapter_id), size, mtime_ns)

    def _apply(self, touched: set[str], before: dict, gen: int, dim: int, removed, added) -> None:
        """Mirror a committed transaction into the cached FAISS indexes that were current (remove,
        then add); families not cached stay on disk untouched (their next load replays the catalog).
        Then, outside ``writer()``, compact the touched families where it is due."""
        try:
            with self.catalog.read():
                live = self.catalog.family_generations()
            for family in touched:
                cached = self._cache.pop(family, None)
                if family not in live:
                    self._stale.discard(family)
                    self._unsaved.discard(family)
                    continue                        # family emptied: its files go at the next prune
                if family in self._stale or cached is None or cached[0] != before.get(family) \
                        or family in self._mapped:
                    continue                        # loaded (base + delta) when next needed
                index = cached[1]
                gone = np.array([i for i, f in removed if f == family], dtype=np.int64)
                if len(gone):
                    self._new_epoch(family)
                if len(gone) and not kinds.remove(index, gone):
                    self._stale.add(family)         # the type cannot remove (HNSW): rebuild and persist it
                    self._unsaved.add(family)
                    continue
                mine = [(i, v) for i, f, v in added if f == family]
                if mine:
                    index.add_with_ids(np.stack([v for _, v in mine]), np.array([i for i, _ in mine], dtype=np.int64))
                if kinds.is_fallback(index, self.factory) and index.ntotal >= self._train_min(dim):
                    self._stale.add(family)         # enough vectors now: train the factory type
                    self._unsaved.add(family)
                    continue
                self._cache[family] = (gen, index)
        except BaseException:
            for family in touched:                  # the catalog is committed; let the next read rebuild
                self._cache.pop(family, None)
            raise
        if not self._deferred:
            self.flush(touched)
        else:
            self._pending.update(touched)

    # -- reads --------------------------------------------------------------------------
    def search(self, vectors, family: str, k: int = 10, nprobe: int | None = None,
               ef_search: int | None = None) -> list[list[tuple[int, float]]]:
        """For each query row, up to ``k`` ``(id, cosine)`` pairs from ``family``, best first.

        ``nprobe`` / ``ef_search`` override the session's for this call (factory indexes only);
        an approximate index may return fewer than ``k`` rows when few lists are probed."""
        queries = np.array(vectors, dtype=np.float32, copy=True)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2:
            raise UsageError(f"search: expected vectors of shape [n, dim], got {queries.shape}")
        if int(k) < 1:
            raise UsageError(f"search: k must be >= 1, got {k}")
        empty = [[] for _ in range(queries.shape[0])]
        dim = self.dim
        if dim is None or queries.shape[0] == 0:
            return empty
        if queries.shape[1] != dim:
            raise IncompatibleError(f"{self.root}: query vectors have dim {queries.shape[1]}, index has dim {dim}")
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        np.divide(queries, norms, out=queries, where=norms > 0)
        queries = np.ascontiguousarray(queries)
        with self._mutex:
            index, gen = self._family_index(family)
            if index is None or index.ntotal == 0:
                return empty
            kk = min(int(k), index.ntotal)
            nprobe, ef_search = int(nprobe or self.nprobe), int(ef_search or self.ef_search)
            found = None
            if self._gpu is not None and kk <= GPU_MAX_K and nprobe <= GPU_MAX_K:
                found = self._gpu.search(family, gen, index, queries, kk, nprobe, epoch=self._epoch.get(family))
            if found is not None:
                scores, ids = found
            else:
                snapshot.tune_blas(dim)
                if self.factory != kinds.FLAT:
                    kinds.set_search_params(index, nprobe, ef_search)
                scores, ids = index.search(queries, kk)
        self._save_repairs()
        return [[(int(i), float(s)) for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]

    def get(self, adapter_id: int) -> dict | None:
        with self._mutex:
            return self.catalog.get(int(adapter_id))

    def get_many(self, ids, brief: bool = False) -> dict[int, dict]:
        """``{id: record}`` for those of ``ids`` that exist, in one catalog read (a query's hits).
        ``brief=True`` leaves out ``ranks``/``metadata``/``info`` (not parsed: cheaper per hit)."""
        with self._mutex, self.catalog.read():
            return self.catalog.get_many([int(i) for i in ids], brief)

    def rerank_blobs(self, ids) -> dict[int, bytes]:
        """``{id: blob}`` of the re-rank records stored with ``upsert(rec["rerank"])``; ids without
        one (or unknown) are left out."""
        with self._mutex, self.catalog.read():
            return self.catalog.rerank_blobs([int(i) for i in ids])

    def by_path(self, path) -> dict | None:
        with self._mutex:
            return self.catalog.by_path(_resolve(path))

    def by_sha256(self, sha256: str) -> list[dict]:
        with self._mutex:
            return self.catalog.by_sha256(sha256)

    def records(self, family: str | None = None) -> list[dict]:
        """All records (without embeddings), ordered by id."""
        with self._mutex, self.catalog.read():
            return self.catalog.records(family)

    def fingerprints(self) -> dict[str, tuple[int, int | None, int | None, str, str]]:
        """``{path: (id, size, mtime_ns, sha256, family)}`` for all adapters: one cheap query, so a
        re-index can skip unchanged files and prune vanished ones without loading full records."""
        with self._mutex:
            return self.catalog.fingerprints()

    def fingerprints_for(self, paths) -> dict[str, tuple[int, int | None, int | None, str, str]]:
        """``fingerprints()`` for just ``paths`` (resolved like catalog keys; absent ones left out):
        looked up by key, so syncing a few files costs the same in an index of any size."""
        keys = list(dict.fromkeys(_resolve(p) for p in paths))
        with self._mutex, self.catalog.read():
            return self.catalog.fingerprints_for(keys)

    def count(self, family: str | None = None) -> int:
        with self._mutex:
            return self.catalog.count(family)

    def families(self) -> dict[str, int]:
        with self._mutex:
            return self.catalog.families()

    def embeddings(self, ids) -> np.ndarray:
        """float32 ``[len(ids), dim]`` in the order given; ``MissingError`` for an unknown id."""
        ids = [int(i) for i in np.atleast_1d(np.asarray(ids, dtype=np.int64))]
        dim = self._require_dim()
        with self._mutex:
            blobs = self.catalog.embeddings(ids)
        missing = [i for i in ids if i not in blobs]
        if missing:
            raise MissingError(f"{self.root}: no adapter with id {missing[0]}")
        if not ids:
            return np.empty((0, dim), np.float32)
        return np.frombuffer(b"".join(blobs[i] for i in ids), dtype=np.float32).reshape(len(ids), dim).copy()

    def stats(self) -> dict:
        with self._mutex, self.catalog.read():
            gens = self.catalog.family_generations()
            bases = self.catalog.family_bases()
            out = {
                "path": str(self.root),
                "count": self.catalog.count(),
                "families": self.catalog.families(),
                "encoder": self.encoder,
                "dim": self.dim,
                "generation": self.catalog.generation(),
                "schema_version": int(self.catalog.meta("schema_version")),
                "snapshots": {f: {"generation": g, "base": bases.get(f, 0),
                                  "on_disk": bool(bases.get(f)) and self._snapshot_path(f, bases[f]).exists(),
                                  "delta": self.catalog.delta_size(f, bases.get(f, 0)),
                                  "index": self._describe(f)} for f, g in sorted(gens.items())},
                "faiss_factory": self.factory,
                "nprobe": self.nprobe,
                "ef_search": self.ef_search,
                "repairs": dict(self.repairs),
                "device": f"cuda:{self._gpu.ordinal}" if self._gpu is not None else "cpu",
                "gpu": self._gpu is not None,
                "gpu_copies": {} if self._gpu is None else self._gpu.generations(),
                "readonly": self.readonly,
            }
        out["disk_bytes"] = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return out

    def _describe(self, family: str) -> str:
        """The index type serving ``family`` (the loaded one, else what a build would give)."""
        if self.factory == kinds.FLAT:
            return kinds.FLAT
        cached = self._cache.get(family)
        n = self.catalog.count(family)
        if cached is not None and family not in self._stale:
            return kinds.describe(cached[1], self.factory, n)
        dim = self._require_dim()
        if n >= self._train_min(dim):
            return self.factory
        return kinds.describe(snapshot.build(dim, np.empty(0, np.int64), None), self.factory, n)

    def check(self) -> dict:
        """Verify every family's FAISS index holds exactly the catalog's ids (ntotal == count).

        Returns ``{"ok": bool, "families": {family: {"catalog", "faiss", "generation",
        "on_disk"}}, "problems": [str]}``; loading rebuilds stale snapshots on the way.
        """
        problems, report = [], {}
        with self._mutex, self.catalog.read():
            counts = self.catalog.families()
            gens = self.catalog.family_generations()
            if set(counts) != set(gens):
                problems.append(f"families table {sorted(gens)} != catalog families {sorted(counts)}")
            for family, n in counts.items():
                index, gen = self._family_index(family)
                ntotal = 0 if index is None else int(index.ntotal)
                base = self._base_path(family)
                report[family] = {"catalog": n, "faiss": ntotal, "generation": gen,
                                  "on_disk": base is not None and base.exists()}
                if ntotal != n:
                    problems.append(f"{family}: FAISS holds {ntotal} vectors, catalog {n}")
                elif index is not None and not np.array_equal(np.sort(snapshot.index_ids(index)),
                                                              self.catalog.family_ids(family)):
                    problems.append(f"{family}: FAISS ids differ from the catalog")
        return {"ok": not problems, "families": report, "problems": problems}
