"""The ``Store`` protocol and ``open_store``: the one place a backend is chosen.

A store keeps adapter records (path, sha256, size, mtime_ns, format, family, ranks, n_modules,
delta_norm, metadata, info, added_at, updated_at) with one L2-normalized embedding each, and
answers per-family cosine searches. Two implementations:

- ``faiss`` (default, embedded): ``store.LoraIndex`` — SQLite catalog + per-family FAISS.
- ``milvus``: ``milvus_store.MilvusStore`` — pymilvus ``MilvusClient``; milvus-lite for a local
  ``x.db`` path, the same code against ``http://host:19530``.

The choice lives in the index folder (``store.json``), so later commands need no flags and a
command that asks for the other backend is refused (exit 2) instead of silently opening an
empty store next to the real one.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import numpy as np

from lorasearch.errors import IncompatibleError, MissingError, UsageError

STORES = ("faiss", "milvus")
CONFIG_FILE = "store.json"
CONFIG_VERSION = 1
DEFAULT_COLLECTION = "lorasearch"



REQUIRED = ("path", "sha256", "family", "embedding")


def resolve_path(path) -> str:
    """The key a store files a path under: absolute, symlinks resolved (os.path.realpath is ~2x
    faster than Path.resolve)."""
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def checked_records(records, dim: int, root) -> list[tuple[dict, str, str, np.ndarray]]:
    """The checks every store makes on an upsert before writing anything (so a refused batch
    leaves the store untouched): required fields, one record per path, a family, a finite
    embedding of the index's dim. Returns (record, resolved path, family, L2-normalized vector)."""
    out, seen = [], set()
    for rec in records:
        missing = [key for key in REQUIRED if rec.get(key) is None]
        if missing:
            raise UsageError(f"{rec.get('path', '<record>')}: record lacks {', '.join(missing)}")
        path = resolve_path(rec["path"])
        if path in seen:
            raise UsageError(f"{path}: appears twice in one upsert")
        seen.add(path)
        family = str(rec["family"])
        if not family:
            raise UsageError(f"{path}: empty family")
        vec = np.asarray(rec["embedding"], dtype=np.float32).reshape(-1)
        if vec.shape[0] != dim:
            raise IncompatibleError(f"{path}: embedding has dim {vec.shape[0]}, index {root} has dim {dim}")
        if not np.isfinite(vec).all():
            raise UsageError(f"{path}: embedding contains NaN or Inf")
        norm = float(np.linalg.norm(vec))
        if norm > 0:
            vec = (vec / norm).astype(np.float32)
        out.append((rec, path, family, vec))
    return out


class RecordedEncoderMixin:
    """The encoder an index was built with, shared by both stores: the first writer records it
    (``_record_encoder``, store-specific), every later one must match it. Needs ``encoder`` (the
    recorded ``{"spec", "version", "dim"}`` or None), ``readonly`` and ``root`` on the store."""

    def encoder_spec(self) -> str | None:
        """The recorded encoder spec (e.g. ``"sketch"``), or None while the index has none."""
        enc = self.encoder
        return None if enc is None else enc["spec"]

    @property
    def dim(self) -> int | None:
        enc = self.encoder
        return None if enc is None else enc["dim"]

    def check_encoder(self, spec: str, version: str, dim: int) -> None:
        """Refuse an encoder other than the one that built the index; the first writer records it."""
        current = self.encoder
        if current is None and not self.readonly:
            self._record_encoder(spec, str(version), int(dim))
            current = self.encoder
        if current is None:
            return          # read-only and empty: nothing to compare with
        if (current["spec"], current["version"], current["dim"]) != (spec, str(version), int(dim)):
            raise IncompatibleError(
                f"{self.root}: index was built with encoder {current['spec']} v{current['version']} "
                f"(dim {current['dim']}), not {spec} v{version} (dim {dim}); "
                "use the same --encoder or a separate --index")

@runtime_checkable
class Store(Protocol):
    """What ingest, query, watch, dedupe and the service call; nothing more.

    Contract (tests/test_store_contract.py runs it on every backend):
    - ids are int64, kept by a path across upserts, never reused after a remove;
    - ``upsert``/``remove`` return only once a search, get or count sees the change;
    - ``search`` compares a query only with its own family, scores are cosines, best first;
    - the first writer records the encoder; another encoder is refused (``IncompatibleError``);
    - one writer at a time (``IndexLockedError``), readers never take the lock.
    """

    readonly: bool

    # encoder recording
    @property
    def encoder(self) -> dict | None: ...
    def encoder_spec(self) -> str | None: ...
    def check_encoder(self, spec: str, version: str, dim: int) -> None: ...

    # writes (each call is one acknowledged unit)
    def writer(self, timeout: float | None = None) -> AbstractContextManager: ...
    def upsert(self, records: Iterable[dict]) -> list[int]: ...
    def remove(self, ids_or_paths) -> int: ...
    def touch(self, adapter_id: int, size: int | None = None, mtime_ns: int | None = None) -> bool: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...

    # reads
    def search(self, vectors, family: str, k: int = 10) -> list[list[tuple[int, float]]]: ...
    def get(self, adapter_id: int) -> dict | None: ...
    def get_many(self, ids) -> dict[int, dict]: ...
    def rerank_blobs(self, ids) -> dict[int, bytes]: ...   # re-rank records stored by upsert(rec["rerank"])
    def by_path(self, path) -> dict | None: ...
    def fingerprints(self) -> dict[str, tuple]: ...
    def records(self, family: str | None = None) -> list[dict]: ...
    def embeddings(self, ids) -> np.ndarray: ...
    def count(self, family: str | None = None) -> int: ...
    def families(self) -> dict[str, int]: ...
    def stats(self) -> dict: ...


def is_remote(uri: str) -> bool:
    return "://" in uri


def _norm_uri(uri: str) -> str:
    """A local milvus-lite file is recorded by its absolute path (commands run from any folder)."""
    return uri if is_remote(uri) else os.path.realpath(os.path.expanduser(uri))


def read_config(root: Path) -> dict | None:
    """The recorded choice, or None for a folder without one (an index made before the choice
    existed is a faiss index when it has a catalog)."""
    p = root / CONFIG_FILE
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"{p}: unreadable store choice ({e}); fix or delete it") from None
    if not isinstance(cfg, dict) or cfg.get("store") not in STORES:
        raise UsageError(f"{p}: unknown store {cfg.get('store') if isinstance(cfg, dict) else cfg!r}")
    if cfg["store"] == "milvus":
        if not isinstance(cfg.get("uri"), str) or not cfg["uri"]:
            raise UsageError(f"{p}: the milvus store needs a \"uri\" string")
        check_collection(cfg.setdefault("collection", DEFAULT_COLLECTION), p)
    return cfg


def check_collection(name, where) -> None:
    """Milvus collection names: a letter or _, then letters, digits, _ (we add ``_meta``: <= 250)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,249}", name):
        raise UsageError(f"{where}: {name!r} is not a Milvus collection name (letters, digits, _)")


def _write_config(root: Path, cfg: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{CONFIG_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(cfg, indent=1) + "\n")
    os.replace(tmp, root / CONFIG_FILE)        # atomic: a reader sees the old file or the new one


def resolve_choice(root: Path, store: str | None = None, milvus_uri: str | None = None,
                   collection: str | None = None) -> dict:
    """Merge what was asked (flags, then env) with what the folder records; refuse mixing.

    Returns ``{"store", "uri", "collection", "recorded": bool}``.
    """
    store = store or os.environ.get("LORASEARCH_STORE") or None
    milvus_uri = milvus_uri or os.environ.get("LORASEARCH_MILVUS_URI") or None
    if store is not None and store not in STORES:
        raise UsageError(f"unknown store {store!r}; choose one of {', '.join(STORES)}")
    if milvus_uri is not None and store is None:
        store = "milvus"                      # a Milvus URI alone means the milvus store
    if milvus_uri is not None and store == "faiss":
        raise UsageError("--milvus-uri applies to --store milvus only, not faiss")
    cfg = read_config(root) if root.is_dir() else None
    if cfg is None and (root / "catalog.sqlite").is_file():
        cfg = {"store": "faiss"}              # an index made before the choice was recorded
    if cfg is not None:
        if store is not None and store != cfg["store"]:
            raise UsageError(f"{root}: this index uses the {cfg['store']} store, not {store}; "
                             "drop --store/$LORASEARCH_STORE or use another --index")
        if milvus_uri is not None and cfg["store"] == "milvus" and _norm_uri(milvus_uri) != cfg.get("uri"):
            raise UsageError(f"{root}: this index lives at Milvus {cfg.get('uri')}, not {milvus_uri}; "
                             "drop --milvus-uri or use another --index")
        return {"store": cfg["store"], "uri": cfg.get("uri"),
                "collection": cfg.get("collection", DEFAULT_COLLECTION), "recorded": True}
    store = store or "faiss"
    if collection is not None:
        check_collection(collection, "collection")
    uri = None
    if store == "milvus":
        uri = _norm_uri(milvus_uri) if milvus_uri else str(root.expanduser().resolve() / "milvus.db")
    return {"store": store, "uri": uri, "collection": collection or DEFAULT_COLLECTION, "recorded": False}


def open_store(path: str | os.PathLike = ".lorasearch", store: str | None = None, milvus_uri: str | None = None,
               create: bool = False, readonly: bool = False, device: str = "auto", lock_timeout: float = 0.0,
               factory: str | None = None, nprobe: int | None = None, ef_search: int | None = None,
               milvus_index: str | None = None, collection: str | None = None) -> Store:
    """Open (or with ``create`` make) the index at ``path`` on the recorded or asked backend.

    ``store``/``milvus_uri`` default to ``$LORASEARCH_STORE`` / ``$LORASEARCH_MILVUS_URI``, then
    to what ``path/store.json`` records, then to ``faiss``. A Milvus token is read from
    ``$LORASEARCH_MILVUS_TOKEN`` only (never recorded on disk). ``factory`` is FAISS-only,
    ``milvus_index`` (FLAT default, HNSW, IVF_FLAT) Milvus-only.
    """
    root = Path(path).expanduser().resolve()
    choice = resolve_choice(root, store, milvus_uri, collection)
    if choice["store"] == "faiss":
        if milvus_index is not None:
            raise UsageError("--milvus-index applies to the milvus store only")
        from .store import LoraIndex

        index = LoraIndex.open(root, create=create, readonly=readonly, device=device, lock_timeout=lock_timeout,
                               factory=factory, nprobe=nprobe, ef_search=ef_search)
        if create and not choice["recorded"] and not readonly:
            _write_config(root, {"version": CONFIG_VERSION, "store": "faiss"})
        return index
    if factory is not None:
        raise UsageError("--faiss-factory applies to the faiss store only; use --milvus-index for milvus")
    if not choice["recorded"] and not create:
        remote = choice["uri"] is not None and is_remote(choice["uri"])
        if not remote:                       # nothing recorded and nothing to reach: no index here
            raise MissingError(f"{root}: no lorasearch index here; build one with `lorasearch index DIR` "
                               "or point --index at one")
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root}: exists and is not a directory")
    from .milvus_store import MilvusStore

    # recorded BEFORE the Milvus side is created: a crash in between must not leave a milvus.db
    # in a folder that a later command (no flags, no store.json) would take for a new faiss index
    record = create and not choice["recorded"] and not readonly
    if record:
        try:
            _write_config(root, {"version": CONFIG_VERSION, "store": "milvus", "uri": choice["uri"],
                                 "collection": choice["collection"]})
        except OSError as e:
            raise MissingError(f"{root}: cannot create an index here ({e.strerror or e})") from None
    try:
        return MilvusStore.open(root, uri=choice["uri"], collection=choice["collection"], create=create,
                                readonly=readonly, lock_timeout=lock_timeout, index_type=milvus_index,
                                nprobe=nprobe, ef_search=ef_search)
    except BaseException:
        if record:
            (root / CONFIG_FILE).unlink(missing_ok=True)      # nothing was made: the choice is not made either
        raise
