"""``MilvusStore``: the ``Store`` protocol on Milvus through pymilvus ``MilvusClient``.

``uri`` is either a local path (``.../milvus.db``: milvus-lite runs embedded in this process)
or a server (``http://host:19530``, token from ``$LORASEARCH_MILVUS_TOKEN``); the code is the same.

Layout — ONE collection per index, family as a partition-key field, not one collection per
(family, encoder). Why: an index has exactly one encoder (a second is refused), so every vector
has the same dim and one collection fits; families are open-ended (a new base model appears
with its first adapter) while collections are a scarce, heavy server resource (each has its own
segments, load state and limits); a partition key makes Milvus hash each family into its own
partitions, so ``family == "sd1"`` searches only that family's segments (the "families never
compared" rule is enforced by the filter, and costs no scan of the others). A second small
``<name>_meta`` collection keeps the recorded encoder, the id counter and the family list, so
another machine needs nothing but the URI.

Every catalog field is a scalar field (path, sha256, size, mtime_ns, format, family, ranks,
n_modules, delta_norm, metadata, info, added_at, updated_at); JSON-valued ones are stored as the
same sorted JSON text the SQLite catalog writes. Limits handled up front (nothing is sent that
Milvus would half-accept): VARCHAR ``max_length`` is in bytes, so a path over ``MAX_PATH`` bytes
or metadata JSON over ``MAX_JSON`` bytes is refused with ``BadAdapterError`` naming the file;
ids are int64 from a counter in the meta collection (kept per path, never reused); ``k`` is
capped at Milvus's top-k limit.

Consistency: both collections are created with ``consistency_level="Strong"``, so a search,
get or count right after an acknowledged upsert/remove sees it (tests check this). Metric: inner
product on L2-normalized vectors (= cosine, as FAISS). Index: ``FLAT`` (exact, the default) or
``HNSW`` / ``IVF_FLAT`` fixed at creation, tuned per search by ``ef_search`` / ``nprobe``.

milvus-lite serves one process at a time (it flocks ``<db>/LOCK``): a second process is told
the file is busy (``IndexLockedError``, exit 75) after ``lock_timeout``; use a Milvus server for
concurrent readers. A Milvus that cannot start or be reached → ``UnavailableError`` (exit 69).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import numbers
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lorasearch.errors import (BadAdapterError, IncompatibleError, IndexLockedError, MissingError,
                               UnavailableError, UsageError)

from .catalog import RECORD_COLUMNS, RERANK_MAX_BYTES, _dumps, _now
from .base import RecordedEncoderMixin, checked_records, resolve_path
from .lock import LockedWriterMixin, WriterLock
from .side_blobs import SideBlobs
from .side_tags import SideTags

LOCK_FILE = "writer.lock"
INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT")
MAX_PATH = 4096            # bytes: Linux PATH_MAX; the VARCHAR is sized to it
MAX_JSON = 65535           # bytes: Milvus's largest VARCHAR
MAX_FAMILY, MAX_FORMAT, MAX_SHA = 256, 64, 64
MAX_TOPK = 16384           # Milvus's limit on k (and on one plain query's rows)
HNSW_M, HNSW_EF_CONSTRUCTION, IVF_NLIST = 32, 200, 128
DEFAULT_NPROBE, DEFAULT_EF = 16, 64
CONNECT_TIMEOUT = 10.0
# rows after which a long write session seals its segment: milvus-lite scans a growing segment
# row by row (each upsert's path lookup grew linearly: 0.03 s at 1k rows, 2.8 s at 5k unsealed)
SEAL_ROWS = 2048
SCHEMA_VERSION = 1
_JSON_FIELDS = ("ranks", "metadata", "info")
_FINGERPRINT = ("id", "path", "size", "mtime_ns", "sha256", "family")


_resolve = resolve_path


def _path_key(path: str) -> int:
    """A signed 64-bit hash of a path: paths are looked up by ``path_key in [...]`` (then compared
    exactly), because a Milvus filter cannot quote every byte a file name may hold (it rejects
    escapes such as \\u0001) and this older milvus-lite has no filter templating."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


def _lit(text: str) -> str:
    """A Milvus string literal for a value our own code produced (family names, sha256 hex)."""
    if any(ord(ch) < 0x20 for ch in text):
        raise UsageError(f"{text!r}: control characters cannot be matched in a Milvus filter")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quiet_pymilvus() -> None:
    """pymilvus logs every failed RPC with a traceback at ERROR; we turn them into one-line errors."""
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)


def _served_here(uri: str) -> bool:
    """Whether this process already serves ``uri`` (milvus-lite keeps one in-process server per
    path and pymilvus reuses it: then the lock below is our own)."""
    try:
        from milvus_lite.server_manager import server_manager_instance
        return os.path.abspath(uri) in server_manager_instance._servers
    except Exception:  # noqa: BLE001 -- a private attribute: if it moves, fall back to the lock test
        return False


def _lite_busy(uri: str, timeout: float) -> bool:
    """Whether another process holds milvus-lite's own lock on ``uri`` (waiting up to ``timeout``)."""
    lock = Path(uri) / "LOCK"
    if not lock.is_file() or _served_here(uri):
        return False
    deadline = time.monotonic() + timeout
    fd = os.open(lock, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return False
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return True
                time.sleep(0.05)
    finally:
        os.close(fd)


def _blobs_of(records: list[dict]) -> dict[str, bytes]:
    """``{sha256: rerank blob}`` of the records that carry one, validated as ``LoraIndex`` does."""
    out = {}
    for rec in records:
        blob = rec.get("rerank")
        if blob is None:
            continue
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise UsageError(f"{rec['path']}: rerank must be bytes, got {type(blob).__name__}")
        if len(blob) > RERANK_MAX_BYTES:
            raise UsageError(f"{rec['path']}: rerank record of {len(blob):,} bytes exceeds the "
                             f"{RERANK_MAX_BYTES:,}-byte bound")
        out[str(rec["sha256"])] = bytes(blob)
    return out


class MilvusStore(LockedWriterMixin, RecordedEncoderMixin):
    """Open with ``MilvusStore.open(root, uri=..., collection=..., create=..., readonly=...)``."""

    def __init__(self, root: Path, client, uri: str, name: str, readonly: bool, lock_timeout: float,
                 nprobe: int | None, ef_search: int | None):
        self.root = root
        self.client = client
        self.uri = uri
        self.name = name
        self.meta_name = f"{name}_meta"
        self.readonly = readonly
        self.lock_timeout = lock_timeout
        self.nprobe = nprobe
        self.ef_search = ef_search
        self._lock = WriterLock(root / LOCK_FILE, label=str(root))
        self._lock_depth = 0
        self._unsealed = 0                        # rows upserted since the last flush
        self._depth_writer = 0                    # nesting of writer() blocks: flush at the outermost exit
        self._mutex = threading.RLock()
        self._encoder: dict | None = None
        self._meta_cache: dict[str, str] = {}
        self._wrote = False
        self.index_type = "FLAT"
        self._side = SideBlobs(root, readonly)    # re-rank records (MiB-sized: beside Milvus, by sha256)
        self.side_tags = SideTags(root, readonly)  # labels (indexer/tags.py), keyed by adapter id

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path, uri: str, collection: str = "lorasearch", create: bool = False,
             readonly: bool = False, lock_timeout: float = 0.0, index_type: str | None = None,
             nprobe: int | None = None, ef_search: int | None = None) -> "MilvusStore":
        if create and readonly:
            raise UsageError(f"{root}: cannot create an index read-only")
        for label, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (not isinstance(value, numbers.Integral) or value < 1):
                raise UsageError(f"{label} must be a positive integer, got {value!r}")
        asked = None if index_type is None else str(index_type).upper()
        if asked is not None and asked not in INDEX_TYPES:
            raise UsageError(f"unknown Milvus index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise UnavailableError("the milvus store needs pymilvus and milvus-lite: "
                                   "pip install 'lorasearch[milvus]'") from None
        _quiet_pymilvus()
        remote = "://" in uri
        if not remote:
            if not Path(uri).exists() and not create:
                raise MissingError(f"{root}: its milvus-lite database {uri} is missing")
            if _lite_busy(uri, lock_timeout):
                raise IndexLockedError(f"{uri}: milvus-lite database is open in another process (milvus-lite "
                                       "serves one process at a time; use a Milvus server for concurrent use)")
        if create:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise MissingError(f"{root}: cannot create an index here ({e.strerror or e})") from None
        try:
            client = MilvusClient(uri=uri, token=os.environ.get("LORASEARCH_MILVUS_TOKEN", ""),
                                  timeout=CONNECT_TIMEOUT)
        except Exception as e:  # noqa: BLE001 -- pymilvus raises many types for "cannot start/connect"
            reason = " ".join(str(getattr(e, "message", None) or e).split())
            raise UnavailableError(f"Milvus at {uri} is unavailable: {reason}") from None
        store = cls(root, client, uri, collection, readonly, lock_timeout, nprobe, ef_search)
        try:
            store._init_meta(create and not readonly, asked)
        except BaseException:
            store.close()
            raise
        return store

    def _init_meta(self, create: bool, index_type: str | None) -> None:
        from pymilvus import DataType

        if not self.client.has_collection(self.meta_name):
            if not create:
                if self.readonly:
                    return                   # nothing written yet: an empty index
                raise MissingError(f"{self.root}: no lorasearch collection {self.name!r} at {self.uri}")
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
            schema.add_field("value", DataType.VARCHAR, max_length=MAX_JSON)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)       # Milvus requires one vector field
            params = self.client.prepare_index_params()
            params.add_index("v", index_type="FLAT", metric_type="L2")
            self.client.create_collection(self.meta_name, schema=schema, index_params=params,
                                          consistency_level="Strong")
            self._set_meta({"schema_version": SCHEMA_VERSION, "next_id": 1, "families": "[]",
                            "index_type": index_type or "FLAT"})
        else:
            self.client.load_collection(self.meta_name)     # a killed process leaves it "released"
            if self.client.has_collection(self.name):
                self.client.load_collection(self.name)
        recorded = self._meta("index_type") or "FLAT"
        if index_type is not None and index_type != recorded:
            raise IncompatibleError(f"{self.root}: index was created with Milvus index {recorded}, not {index_type}")
        self.index_type = recorded

    def close(self) -> None:
        with self._mutex:
            try:
                if self._wrote and not self.readonly:
                    self.flush()
            finally:
                if self._lock_depth:
                    self._lock_depth = 0
                    self._lock.release()
                self._side.close()
                self.side_tags.close()
                if self.client is not None:
                    self.client.close()
                    self.client = None

    def __enter__(self) -> "MilvusStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MilvusStore({str(self.root)!r}, uri={self.uri!r}, readonly={self.readonly})"

    # -- meta ---------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        if not self.client.has_collection(self.meta_name):
            return None
        rows = self.client.get(self.meta_name, ids=[key], output_fields=["value"])
        return rows[0]["value"] if rows else None

    def _set_meta(self, items: dict) -> None:
        self.client.upsert(self.meta_name, [{"key": k, "value": str(v), "v": [0.0, 0.0]} for k, v in items.items()])

    # -- encoder ------------------------------------------------------------------------
    @property
    def encoder(self) -> dict | None:
        if self._encoder is None:
            spec = self._meta("encoder_spec")
            if spec is not None:
                self._encoder = {"spec": spec, "version": self._meta("encoder_version"),
                                 "dim": int(self._meta("dim"))}
        return None if self._encoder is None else dict(self._encoder)

    def _record_encoder(self, spec: str, version: str, dim: int) -> None:
        """The vector collection is created with the first encoder (its dim is known only now)."""
        with self._mutex, self._writing():
            if self._meta("encoder_spec") is None:
                self._create_collection(dim)
                self._set_meta({"encoder_spec": spec, "encoder_version": version, "dim": dim})

    def _create_collection(self, dim: int) -> None:
        from pymilvus import DataType

        if self.client.has_collection(self.name):
            self.client.drop_collection(self.name)       # a leftover from a creation that died before recording
        s = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.INT64, is_primary=True)
        s.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
        s.add_field("path_key", DataType.INT64)
        s.add_field("sha256", DataType.VARCHAR, max_length=MAX_SHA)
        s.add_field("size", DataType.INT64, nullable=True)
        s.add_field("mtime_ns", DataType.INT64, nullable=True)
        s.add_field("format", DataType.VARCHAR, max_length=MAX_FORMAT, nullable=True)
        s.add_field("family", DataType.VARCHAR, max_length=MAX_FAMILY, is_partition_key=True)
        for f in _JSON_FIELDS:
            s.add_field(f, DataType.VARCHAR, max_length=MAX_JSON, nullable=True)
        s.add_field("n_modules", DataType.INT64, nullable=True)
        s.add_field("delta_norm", DataType.DOUBLE, nullable=True)
        s.add_field("added_at", DataType.VARCHAR, max_length=32)
        s.add_field("updated_at", DataType.VARCHAR, max_length=32)
        s.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
        params = self.client.prepare_index_params()
        kind = self.index_type
        extra = {"HNSW": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION},
                 "IVF_FLAT": {"nlist": IVF_NLIST}}.get(kind, {})
        params.add_index("embedding", index_type=kind, metric_type="IP", params=extra)
        try:
            self.client.create_collection(self.name, schema=s, index_params=params, consistency_level="Strong")
        except Exception as e:  # noqa: BLE001
            raise UnavailableError(f"Milvus at {self.uri} cannot create a {kind} collection: "
                                   f"{' '.join(str(getattr(e, 'message', None) or e).split())}") from None

    # -- locking ------------------------------------------------------------------------

    @contextmanager
    def writer(self, timeout: float | None = None) -> Iterator["MilvusStore"]:
        """Hold the writer lock across many calls (each call is still acknowledged on its own).

        The lock is a flock in the index folder: it serializes writers that share that folder
        (one machine); writers on several machines against one server need one driver (e.g.
        ``index --ray``: many readers/encoders, one writer)."""
        with self._mutex:
            self._acquire(timeout)
            self._depth_writer += 1
        try:
            yield self
        finally:
            with self._mutex:
                self._depth_writer -= 1
                try:
                    if self._depth_writer == 0 and self._wrote:
                        self.flush()    # seal at the end of a write session: a growing segment is
                finally:                # searched row by row by milvus-lite (~0.5 s at 2k rows)
                    self._release()

    def flush(self) -> None:
        """Seal the growing segments (indexed, fast to search; durable storage on a server). Not
        needed for visibility: Strong consistency already shows every acknowledged write. Done at
        the end of each ``writer()`` block and on close, not per upsert (many small segments
        would slow a server down)."""
        if self.client is not None and self.client.has_collection(self.name):
            self.client.flush(self.name)
        self._wrote = False
        self._unsealed = 0

    # -- writes -------------------------------------------------------------------------
    def _require_dim(self) -> int:
        dim = self.dim
        if dim is None:
            raise UsageError(f"{self.root}: no encoder recorded yet; call check_encoder(spec, version, dim) first")
        return dim

    def _prepare(self, records: list[dict], dim: int) -> list[tuple[dict, np.ndarray]]:
        """Validate before anything is sent, so a refused record leaves the store untouched."""
        out = []
        for rec, path, family, vec in checked_records(records, dim, self.root):
            if any(ord(ch) < 0x20 for ch in family):
                raise BadAdapterError(path, f"family {family!r} holds control characters")
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                raise BadAdapterError(path, "its path is not valid UTF-8 (the Milvus store keeps paths as text)") from None
            row = {"path": path, "path_key": _path_key(path), "sha256": str(rec["sha256"]), "family": family,
                   "format": None if rec.get("format") is None else str(rec["format"]),
                   "size": rec.get("size"), "mtime_ns": rec.get("mtime_ns"),
                   "n_modules": rec.get("n_modules"),
                   "delta_norm": None if rec.get("delta_norm") is None else float(rec["delta_norm"])}
            for f in _JSON_FIELDS:
                row[f] = _dumps(rec.get(f))
            for field, limit in (("path", MAX_PATH), ("sha256", MAX_SHA), ("family", MAX_FAMILY),
                                 ("format", MAX_FORMAT), ("ranks", MAX_JSON), ("metadata", MAX_JSON),
                                 ("info", MAX_JSON)):
                value = row[field]
                if value is not None and len(value.encode("utf-8", "surrogatepass")) > limit:
                    raise BadAdapterError(path, f"its {field} is {len(value.encode('utf-8', 'surrogatepass'))} "
                                                f"bytes, over the Milvus store's limit of {limit} bytes")
            for field in ("size", "mtime_ns", "n_modules"):
                if row[field] is not None:
                    row[field] = int(row[field])
                    if not -2**63 <= row[field] < 2**63:
                        raise BadAdapterError(path, f"its {field} {row[field]} does not fit in int64")
            out.append((row, vec))
        return out

    def _existing(self, paths: list[str]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        wanted = set(paths)
        keys = sorted({_path_key(p) for p in wanted})
        for i in range(0, len(keys), 1000):
            rows = self.client.query(self.name, filter=f"path_key in {keys[i:i + 1000]}",
                                     output_fields=["id", "path", "family", "added_at"])
            found.update({r["path"]: r for r in rows if r["path"] in wanted})   # a hash collision is not a match
        return found

    def upsert(self, records: Iterable[dict]) -> list[int]:
        """Insert or replace adapters by path (one Milvus upsert); returns their ids in order."""
        records = list(records)
        if not records:
            return []
        with self._mutex, self._writing():
            dim = self._require_dim()
            prepared = self._prepare(records, dim)
            self._side.put(_blobs_of(records))    # before the rows: a crash leaves an unused blob at worst
            existing = self._existing([r["path"] for r, _ in prepared])
            fresh = sum(1 for r, _ in prepared if r["path"] not in existing)
            next_id = int(self._meta("next_id"))
            if next_id + fresh >= 2**63:
                raise UsageError(f"{self.root}: int64 ids exhausted")
            families = set(json.loads(self._meta("families") or "[]"))
            new_families = {r["family"] for r, _ in prepared} - families
            # the counter (and new family names) are committed before the rows: a crash in between
            # only skips ids, it never hands one out twice
            self._set_meta({"next_id": next_id + fresh,
                            **({"families": json.dumps(sorted(families | new_families))} if new_families else {})})
            now = _now()
            rows, ids = [], []
            for row, vec in prepared:
                old = existing.get(row["path"])
                if old is None:
                    adapter_id, added = next_id, now
                    next_id += 1
                else:
                    adapter_id, added = int(old["id"]), old["added_at"]
                rows.append(dict(row, id=adapter_id, added_at=added, updated_at=now, embedding=vec.tolist()))
                ids.append(adapter_id)
            self.client.upsert(self.name, rows)
            self._wrote = True
            self._unsealed += len(rows)
            if self._unsealed >= SEAL_ROWS:
                self.flush()
        return ids

    def remove(self, ids_or_paths) -> int:
        if isinstance(ids_or_paths, (numbers.Integral, str, os.PathLike)):
            ids_or_paths = [ids_or_paths]
        with self._mutex, self._writing():
            if not self.client.has_collection(self.name):
                return 0
            targets: set[int] = set()
            paths: list[str] = []
            for item in ids_or_paths:
                if isinstance(item, numbers.Integral):
                    if self.get(int(item)) is not None:
                        targets.add(int(item))
                elif isinstance(item, (str, os.PathLike)):
                    paths.append(_resolve(item))
                else:
                    raise UsageError(f"remove: expected an id or a path, got {item!r}")
            if paths:
                targets |= {int(r["id"]) for r in self._existing(paths).values()}
            if targets:
                shas = {r["sha256"] for r in self.get_many(sorted(targets)).values()}
                self.client.delete(self.name, ids=sorted(targets))
                self._wrote = True
                self._side.drop([s for s in shas if not self.by_sha256(s)])   # no row of that content left
                self.side_tags.drop(sorted(targets))                             # labels go with the adapter
        return len(targets)

    def touch(self, adapter_id: int, size: int | None = None, mtime_ns: int | None = None) -> bool:
        with self._mutex, self._writing():
            if not self.client.has_collection(self.name):
                return False
            rows = self.client.get(self.name, ids=[int(adapter_id)], output_fields=["*"])
            if not rows:
                return False
            row = dict(rows[0])
            row.update(size=size, mtime_ns=mtime_ns)
            row["embedding"] = [float(x) for x in row["embedding"]]
            self.client.upsert(self.name, [row])
            self._wrote = True
        return True

    # -- reads --------------------------------------------------------------------------
    def _ready(self) -> bool:
        return self.client is not None and self.dim is not None and self.client.has_collection(self.name)

    def search(self, vectors, family: str, k: int = 10, nprobe: int | None = None,
               ef_search: int | None = None) -> list[list[tuple[int, float]]]:
        """For each query row, up to ``k`` ``(id, cosine)`` pairs from ``family``, best first."""
        queries = np.array(vectors, dtype=np.float32, copy=True)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2:
            raise UsageError(f"search: expected vectors of shape [n, dim], got {queries.shape}")
        if int(k) < 1:
            raise UsageError(f"search: k must be >= 1, got {k}")
        empty = [[] for _ in range(queries.shape[0])]
        if queries.shape[0] == 0 or not self._ready() or any(ord(ch) < 0x20 for ch in str(family)):
            return empty
        if queries.shape[1] != self.dim:
            raise IncompatibleError(f"{self.root}: query vectors have dim {queries.shape[1]}, index has dim {self.dim}")
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        np.divide(queries, norms, out=queries, where=norms > 0)
        params: dict = {}
        if self.index_type == "HNSW":
            params = {"ef": max(int(ef_search or self.ef_search or DEFAULT_EF), int(k))}
        elif self.index_type == "IVF_FLAT":
            params = {"nprobe": int(nprobe or self.nprobe or DEFAULT_NPROBE)}
        with self._mutex:
            hits = self.client.search(self.name, data=queries.tolist(), limit=min(int(k), MAX_TOPK),
                                      filter=f"family == {_lit(str(family))}",
                                      anns_field="embedding", output_fields=[],
                                      search_params={"metric_type": "IP", "params": params})
        return [[(int(h["id"]), float(h["distance"])) for h in row] for row in hits]

    @staticmethod
    def _record(row: dict) -> dict:
        rec = {c: row.get(c) for c in RECORD_COLUMNS}
        rec["id"] = int(rec["id"])
        for f in _JSON_FIELDS:
            if rec[f] is not None:
                rec[f] = json.loads(rec[f])
        return rec

    def get(self, adapter_id: int) -> dict | None:
        return self.get_many([adapter_id]).get(int(adapter_id))

    def get_many(self, ids) -> dict[int, dict]:
        ids = [int(i) for i in ids]
        if not ids or not self._ready():
            return {}
        out = {}
        with self._mutex:
            for i in range(0, len(ids), MAX_TOPK):
                rows = self.client.get(self.name, ids=ids[i:i + MAX_TOPK], output_fields=list(RECORD_COLUMNS))
                out.update({int(r["id"]): self._record(r) for r in rows})
        return out

    def rerank_blobs(self, ids) -> dict[int, bytes]:
        """``{id: blob}`` of the re-rank records stored with ``upsert(rec["rerank"])`` (ids without one
        are left out); kept in ``rerank.sqlite`` beside the collection, keyed by sha256."""
        recs = self.get_many(ids)
        blobs = self._side.get([r["sha256"] for r in recs.values()])
        return {i: blobs[r["sha256"]] for i, r in recs.items() if r["sha256"] in blobs}

    def by_path(self, path) -> dict | None:
        if not self._ready():
            return None
        key = _resolve(path)
        with self._mutex:
            rows = self.client.query(self.name, filter=f"path_key == {_path_key(key)}",
                                     output_fields=list(RECORD_COLUMNS))
        rows = [r for r in rows if r["path"] == key]
        return self._record(rows[0]) if rows else None

    def by_sha256(self, sha256: str) -> list[dict]:
        if not self._ready():
            return []
        with self._mutex:
            rows = self.client.query(self.name, filter=f"sha256 == {_lit(str(sha256))}",
                                     output_fields=list(RECORD_COLUMNS))
        return sorted((self._record(r) for r in rows), key=lambda r: r["id"])

    def _scan(self, fields: list[str], filter: str = "") -> list[dict]:
        """Every matching row, in batches (a plain query is capped at MAX_TOPK rows)."""
        if not self._ready():
            return []
        rows: list[dict] = []
        with self._mutex:
            it = self.client.query_iterator(self.name, batch_size=4096, filter=filter, output_fields=fields)
            try:
                while True:
                    batch = it.next()
                    if not batch:
                        break
                    rows.extend(batch)
            finally:
                it.close()
        return rows

    def fingerprints(self) -> dict[str, tuple]:
        """``{path: (id, size, mtime_ns, sha256, family)}`` for all adapters."""
        return {r["path"]: (int(r["id"]), r["size"], r["mtime_ns"], r["sha256"], r["family"])
                for r in self._scan(list(_FINGERPRINT))}

    def records(self, family: str | None = None) -> list[dict]:
        rows = self._scan(list(RECORD_COLUMNS), "" if family is None else f"family == {_lit(str(family))}")
        return sorted((self._record(r) for r in rows), key=lambda r: r["id"])

    def embeddings(self, ids) -> np.ndarray:
        ids = [int(i) for i in np.atleast_1d(np.asarray(ids, dtype=np.int64))]
        dim = self._require_dim()
        if not ids:
            return np.empty((0, dim), np.float32)
        with self._mutex:
            rows = {int(r["id"]): r["embedding"] for r in
                    self.client.get(self.name, ids=ids, output_fields=["embedding"])} if self._ready() else {}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise MissingError(f"{self.root}: no adapter with id {missing[0]}")
        return np.asarray([rows[i] for i in ids], dtype=np.float32).reshape(len(ids), dim)

    def count(self, family: str | None = None) -> int:
        if not self._ready():
            return 0
        with self._mutex:
            if family is None:
                rows = self.client.query(self.name, filter="", output_fields=["count(*)"])
            else:
                rows = self.client.query(self.name, filter=f"family == {_lit(str(family))}",
                                         output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def families(self) -> dict[str, int]:
        known = json.loads(self._meta("families") or "[]")
        counts = {f: self.count(f) for f in known}
        return {f: n for f, n in sorted(counts.items()) if n > 0}

    def stats(self) -> dict:
        out = {
            "path": str(self.root),
            "store": "milvus",
            "milvus_uri": self.uri,
            "collection": self.name,
            "count": self.count(),
            "families": self.families(),
            "encoder": self.encoder,
            "dim": self.dim,
            "milvus_index": getattr(self, "index_type", "FLAT"),
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "consistency": "Strong",
            "readonly": self.readonly,
        }
        if "://" not in self.uri and Path(self.uri).exists():
            out["disk_bytes"] = sum(p.stat().st_size for p in Path(self.uri).rglob("*") if p.is_file())
        return out
