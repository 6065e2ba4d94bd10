"""The Python face of lorasearch: every CLI command is one method here, returning a typed result.

    ls = Lorasearch("./.lorasearch", create=True)
    report = ls.index_dir("./adapters")          # SyncReport; unchanged files are skipped
    result = ls.query("my_lora.safetensors", k=10)
    for hit in result.hits: ...                  # Hit dataclasses; result.as_dict() is the --json object

A thin facade: the stages live in ``ingest`` (stat/sync/flush/prune), ``query``, ``watch`` and
``results`` (the typed results and the one JSON envelope).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from lorasearch import ingest as _ingest
from lorasearch import query as _query
from lorasearch import watch as _watch
from lorasearch.errors import IncompatibleError, MissingError
from lorasearch.ingest import adapter_root, is_peft_folder, stat_adapter  # noqa: F401 -- public helpers
from lorasearch.query import RERANK_BYTES, RERANK_FACTOR, RERANK_MIN, SAME_UPDATE_COSINE  # noqa: F401
from lorasearch.results import (JSON_VERSION, DedupeResult, ExplainResult, InfoResult,  # noqa: F401
                                LabelResult, LabelsResult, QueryResult, RemoveResult, StatsResult,
                                SyncReport, TagResult, UntagResult)

DEFAULT_INDEX = ".lorasearch"


def __getattr__(name: str):
    """``from lorasearch.api import exact_cosines`` still works; imported on demand (similarity
    pulls in heavier modules than a CLI call needs)."""
    if name == "exact_cosines":
        from lorasearch.similarity import exact_cosines

        return exact_cosines
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_index_path() -> Path:
    return Path(os.environ.get("LORASEARCH_INDEX") or DEFAULT_INDEX)


def info(path: str | os.PathLike, index: str | os.PathLike | None = None) -> InfoResult:
    """Format, family, modules, ranks, alpha, metadata and warnings of one adapter (``lorasearch info``).

    With ``index``: when an index exists there and the file is in it, ``indexed`` gives its id and
    labels. The index is opened read-only and only if it is there; it never makes ``info`` fail."""
    from lorasearch.adapters import describe, load_adapter

    path = Path(path)
    if not path.exists():
        raise MissingError(f"{path}: no such file or directory")
    stat_adapter(adapter_root(path))     # a FIFO/device is refused before anything opens it
    res = InfoResult(describe(load_adapter(path)))
    if index is not None:
        res.indexed = _indexed_entry(Path(index), path)
    return res


def _indexed_entry(index: Path, path: Path) -> dict | None:
    """``{"index", "id", "labels"}`` of ``path`` in the faiss index at ``index``, or None (no index
    there, not indexed, unreadable index). Only an existing SQLite catalog is opened (labels live
    there; never a Milvus connection that could hang ``info``)."""
    from lorasearch.indexer.store import CATALOG_FILE

    if not (index / CATALOG_FILE).is_file():
        return None
    try:
        with Lorasearch(index, readonly=True, device="cpu") as ls:
            from lorasearch.indexer import tags

            rec = ls.index.by_path(os.path.realpath(adapter_root(path)))
            if rec is None:
                return None
            return {"index": str(ls.path), "id": rec["id"],
                    "labels": tags.labels_of(ls.index, [rec["id"]]).get(rec["id"], [])}
    except Exception:  # noqa: BLE001 -- the index is an extra here: `info` describes the file regardless
        return None


class Lorasearch:
    """An index of LoRA adapters on disk plus the encoder that built it."""

    def __init__(self, index_path: str | os.PathLike | None = None, encoder: str | None = None,
                 device: str = "auto", create: bool = False, readonly: bool = False,
                 lock_timeout: float = 0.0, faiss_factory: str | None = None,
                 nprobe: int | None = None, ef_search: int | None = None, store: str | None = None,
                 milvus_uri: str | None = None, milvus_index: str | None = None):
        """``faiss_factory`` (e.g. ``"IVF1024,Flat"``, ``"HNSW32"``) is fixed when the index is
        created (default: exact Flat); ``nprobe`` / ``ef_search`` tune approximate search."""
        from lorasearch.indexer import open_store

        self.path = Path(index_path) if index_path is not None else default_index_path()
        self.device = device
        self.index = open_store(self.path, store=store, milvus_uri=milvus_uri, create=create, readonly=readonly,
                                device=device, lock_timeout=lock_timeout, factory=faiss_factory,
                                nprobe=nprobe, ef_search=ef_search, milvus_index=milvus_index)
        self._encoder_spec = encoder
        self._encoder = None

    def close(self) -> None:
        """Close the catalog connection (and the GPU copy); also on leaving a ``with`` block."""
        self.index.close()

    def __enter__(self) -> "Lorasearch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def encoder(self):
        """The encoder this index was built with; a different ``--encoder`` is refused."""
        if self._encoder is None:
            from lorasearch.encoders import get_encoder

            recorded = self.index.encoder_spec()
            enc = get_encoder(self._encoder_spec or recorded, device=self.device)
            # compare normalized specs: `sketch:dim=1024` is the recorded `sketch`
            if recorded and self._encoder_spec and enc.spec != recorded:
                raise IncompatibleError(
                    f"index {self.path} was built with encoder {recorded!r}, not {enc.spec!r}; "
                    f"use a separate --index for another encoder")
            self._encoder = enc
        return self._encoder

    def _sync(self) -> _ingest.Sync:
        return _ingest.Sync(self.index, lambda: self.encoder, self.device)

    # -- writing -----------------------------------------------------------------------------
    def index_dir(self, root: str | os.PathLike, prune: bool = False, progress: bool | None = None) -> SyncReport:
        """Index every adapter under ``root`` (or one adapter file / PEFT folder), incrementally."""
        return _ingest.index_dir(self._sync(), root, prune=prune, progress=progress)

    def add(self, paths: Iterable[str | os.PathLike], progress: bool | None = None) -> SyncReport:
        """Add or refresh adapter files and PEFT folders; a plain folder adds every adapter under it."""
        return _ingest.add(self._sync(), paths, progress=progress)

    def remove(self, ids_or_paths: Iterable[str | int]) -> RemoveResult:
        """Remove by id, path (absolute or relative, the file need not exist any more) or folder
        (every adapter indexed under it). ``removed, not_found = ls.remove(...)`` also works."""
        removed, missing = [], []
        for item in ids_or_paths:
            rec = self._lookup(item)
            if rec is not None:
                removed.append(rec["path"])
                continue
            inside = [] if str(item).isdigit() else \
                [p for p in _ingest.indexed_under(self.index, adapter_root(Path(str(item))))]
            if inside:
                removed.extend(inside)
            else:
                missing.append(str(item))
        removed = list(dict.fromkeys(removed))
        if removed:
            with self.index.writer():
                self.index.remove(removed)
        return RemoveResult(removed, missing)

    def _lookup(self, item: str | int):
        text = str(item)
        if text.isdigit():
            rec = self.index.get(int(text))
            if rec is not None:
                return rec
        return self.index.by_path(os.path.realpath(adapter_root(Path(text))))

    # -- reading -----------------------------------------------------------------------------
    def query(self, path: str | os.PathLike, k: int = 10, threshold: float | None = None,
              rerank: int | None = None) -> QueryResult:
        """The ``k`` adapters most like the one at ``path`` (same family only); see ``query.run_query``."""
        return _query.run_query(self.index, self.encoder, path, k=k, threshold=threshold,
                                rerank=rerank, device=self.device)

    def stats(self) -> StatsResult:
        return StatsResult(str(self.path), self.index.stats())

    info = staticmethod(info)

    # -- auditing (issue 12: lorasearch.audit, labels in indexer.tags) -----------------------
    def dedupe(self, threshold: float | None = None, norm_tol: float | None = None, k: int | None = None,
               bound: float | None = None, family: str | None = None) -> DedupeResult:
        """Clusters of the same adapter (exact or same-update) across the index; see ``audit.dedupe``."""
        from lorasearch import audit

        given = dict(threshold=threshold, norm_tol=norm_tol, k=k, bound=bound)
        return audit.dedupe(self, family=family, **{n: v for n, v in given.items() if v is not None})

    def explain(self, path: str | os.PathLike, k: int | None = None) -> ExplainResult:
        """Is ``path`` a merge of indexed adapters? NNLS over its top-``k`` candidates' exact ΔW."""
        from lorasearch import audit

        return audit.explain(self, path, k=audit.EXPLAIN_K if k is None else k)

    def label(self, path: str | os.PathLike, k: int | None = None, min_similarity: float | None = None,
              min_agreement: float | None = None, rerank: int | None = None) -> LabelResult:
        """Labels of ``path`` predicted from its labelled neighbours (similarity-weighted kNN)."""
        from lorasearch import audit

        given = dict(k=k, min_similarity=min_similarity, min_agreement=min_agreement)
        return audit.label(self, path, rerank=rerank, **{n: v for n, v in given.items() if v is not None})

    def tag(self, item: str | int | None = None, labels: Iterable[str] = (),
            labels_file: str | os.PathLike | None = None) -> TagResult:
        """Attach ``labels`` to the adapter ``item`` (id or path), or every row of a ``name,label`` CSV."""
        from lorasearch import audit

        return audit.tag(self, item, list(labels), labels_file)

    def untag(self, item: str | int, labels: Iterable[str] = ()) -> UntagResult:
        """Detach ``labels`` (all when none are given) from the adapter ``item`` (id or path)."""
        from lorasearch import audit

        return audit.untag(self, item, list(labels))

    def labels(self) -> LabelsResult:
        """Every label in the index and how many adapters carry it."""
        from lorasearch import audit

        return audit.label_counts(self)

    # -- watching ----------------------------------------------------------------------------
    def watch(self, root: str | os.PathLike, interval: float = 2.0, prune: bool = True,
              stop: Callable[[], bool] | None = None,
              on_report: Callable[[SyncReport], None] | None = None,
              on_note: Callable[[str], None] | None = None, settle: float | None = None) -> None:
        """Poll ``root`` and index adapters as they appear, change or disappear (see ``watch``)."""
        _watch.watch(self._sync(), root, interval=interval, prune=prune, stop=stop,
                     on_report=on_report, on_note=on_note, settle=settle)
