"""The Python face of lorasearch: every CLI command is one method here.

    ls = Lorasearch("./.lorasearch", create=True)
    report = ls.index_dir("./adapters")          # incremental: unchanged files are skipped
    result = ls.query("my_lora.safetensors", k=10)

Stages are plain calls: adapters.load_adapter → canonical.canonicalize_many → encoder.encode
→ indexer. Query candidates from FAISS are re-scored by the exact Frobenius cosine of ΔW
computed from the factors (DESIGN decision 3).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from lorasearch.errors import BadAdapterError, IncompatibleError, LorasearchError, MissingError

JSON_VERSION = 1
SAME_UPDATE_COSINE = 0.999   # issue 2: "the same ΔW … cosine ≥ 0.999"
SAME_UPDATE_NORM_TOL = 0.01  # and the same size: a ΔW scaled ×2 is a different update
DEFAULT_INDEX = ".lorasearch"
EMBED_BATCH = 16


def default_index_path() -> Path:
    return Path(os.environ.get("LORASEARCH_INDEX") or DEFAULT_INDEX)


def stat_adapter(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of an adapter file, or of a PEFT folder's files taken together."""
    if path.is_dir():
        size, mtime = 0, 0
        for p in sorted(path.iterdir()):
            if p.is_file():
                st = p.stat()
                size += st.st_size
                mtime = max(mtime, st.st_mtime_ns)
        return size, mtime
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@dataclass
class SyncReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)   # (path, one-line message)

    def as_dict(self) -> dict:
        return {
            "version": JSON_VERSION,
            "added": self.added,
            "updated": self.updated,
            "unchanged": len(self.unchanged),
            "removed": self.removed,
            "errors": [{"path": p, "error": e} for p, e in self.errors],
        }

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
                f"{len(self.removed)} removed, {len(self.errors)} failed")


class Lorasearch:
    """An index of LoRA adapters on disk plus the encoder that built it."""

    def __init__(self, index_path: str | os.PathLike | None = None, encoder: str | None = None,
                 device: str = "auto", create: bool = False, readonly: bool = False):
        from lorasearch.indexer import LoraIndex

        self.path = Path(index_path) if index_path is not None else default_index_path()
        self.device = device
        self.index = LoraIndex.open(self.path, create=create, readonly=readonly, device=device)
        self._encoder_spec = encoder
        self._encoder = None

    # -- encoder -----------------------------------------------------------------------------
    @property
    def encoder(self):
        """The encoder this index was built with; a different ``--encoder`` is refused."""
        if self._encoder is None:
            from lorasearch.encoders import get_encoder

            recorded = self.index.encoder_spec()
            spec = self._encoder_spec or recorded
            if recorded and self._encoder_spec and self._encoder_spec != recorded:
                raise IncompatibleError(
                    f"index {self.path} was built with encoder {recorded!r}, not {self._encoder_spec!r}; "
                    f"use a separate --index for another encoder")
            self._encoder = get_encoder(spec)
        return self._encoder

    def _embed(self, adapters: list) -> np.ndarray:
        from lorasearch.canonical import canonicalize_many

        canon = canonicalize_many(adapters, device=self.device)
        return self.encoder.encode(canon)

    # -- writing -----------------------------------------------------------------------------
    def index_dir(self, root: str | os.PathLike, prune: bool = False,
                  progress: bool | None = None) -> SyncReport:
        """Index every adapter under ``root``; skip unchanged files; optionally prune deleted ones."""
        from lorasearch.adapters import find_adapters

        root = Path(root)
        if not root.exists():
            raise MissingError(f"{root}: no such file or directory")
        if not root.is_dir():
            raise MissingError(f"{root}: not a directory (use `lorasearch add FILE` for single files)")
        paths = find_adapters(root)
        report = self._sync(paths, progress=progress)
        if prune:
            under = str(root.resolve())
            present = {str(p.resolve()) for p in paths}
            gone = [r["path"] for r in self.index.records()
                    if (r["path"] + os.sep).startswith(under + os.sep) and r["path"] not in present]
            if gone:
                with self.index.writer():
                    self.index.remove(gone)
                report.removed.extend(gone)
        return report

    def add(self, paths: Iterable[str | os.PathLike], progress: bool | None = None) -> SyncReport:
        """Add or refresh specific adapter files/folders."""
        todo = []
        report = SyncReport()
        for p in paths:
            p = Path(p)
            if not p.exists():
                report.errors.append((str(p), f"{p}: no such file or directory"))
            else:
                todo.append(p)
        sub = self._sync(todo, progress=progress)
        sub.errors = report.errors + sub.errors
        return sub

    def remove(self, ids_or_paths: Iterable[str | int]) -> tuple[list[str], list[str]]:
        """Remove by id or path. Returns (removed, not_found)."""
        removed, missing = [], []
        targets = []
        for item in ids_or_paths:
            rec = self._lookup(item)
            if rec is None:
                missing.append(str(item))
            else:
                targets.append(rec["path"])
                removed.append(rec["path"])
        if targets:
            with self.index.writer():
                self.index.remove(targets)
        return removed, missing

    def _lookup(self, item: str | int):
        text = str(item)
        if text.isdigit():
            rec = self.index.get(int(text))
            if rec is not None:
                return rec
        return self.index.by_path(str(Path(text).resolve()))

    def _sync(self, paths: list[Path], progress: bool | None = None) -> SyncReport:
        """The one ingest path: stat → (skip | hash → (touch | load → embed → upsert))."""
        from lorasearch.adapters import adapter_sha256, load_adapter

        report = SyncReport()
        work: list[tuple[Path, int, int, dict | None]] = []
        for p in paths:
            resolved = p.resolve()
            try:
                size, mtime = stat_adapter(resolved)
            except OSError as e:
                report.errors.append((str(p), f"{p}: {e.strerror or e}"))
                continue
            old = self.index.by_path(str(resolved))
            if old is not None and old["size"] == size and old["mtime_ns"] == mtime:
                report.unchanged.append(str(resolved))
            else:
                work.append((resolved, size, mtime, old))
        if not work:
            return report
        _ = self.encoder  # resolve (and check) the encoder before taking the lock
        bar = _progress(len(work), "indexing", progress)
        with self.index.writer():
            batch: list[dict] = []
            adapters: list = []
            for resolved, size, mtime, old in work:
                try:
                    sha = adapter_sha256(resolved)
                    if old is not None and old["sha256"] == sha:
                        # same bytes, only the timestamp moved: refresh stat, keep the vector
                        self.index.touch(old["id"], size=size, mtime_ns=mtime)
                        report.unchanged.append(str(resolved))
                        bar.update(1)
                        continue
                    adapter = load_adapter(resolved, sha256=sha)
                except LorasearchError as e:
                    report.errors.append((str(resolved), str(e)))
                    bar.update(1)
                    continue
                except OSError as e:
                    report.errors.append((str(resolved), f"{resolved}: {e.strerror or e}"))
                    bar.update(1)
                    continue
                adapter.sha256 = sha
                batch.append(self._record(adapter, resolved, size, mtime))
                adapters.append(adapter)
                (report.updated if old is not None else report.added).append(str(resolved))
                if len(adapters) >= EMBED_BATCH:
                    self._flush(batch, adapters)
                    bar.update(len(adapters))
                    batch, adapters = [], []
            if adapters:
                self._flush(batch, adapters)
                bar.update(len(adapters))
        bar.close()
        return report

    def _record(self, adapter, path: Path, size: int, mtime: int) -> dict:
        from lorasearch.adapters import describe
        from lorasearch.similarity import delta_norm

        info = describe(adapter)
        info.pop("modules", None)   # the per-module table is recomputed by `info`; keep rows small
        return {
            "path": str(path), "sha256": adapter.sha256, "size": size, "mtime_ns": mtime,
            "format": adapter.format, "family": adapter.family,
            "ranks": sorted({m.rank for m in adapter.modules}), "n_modules": len(adapter.modules),
            "delta_norm": float(delta_norm(adapter)), "metadata": adapter.metadata, "info": info,
        }

    def _flush(self, batch: list[dict], adapters: list) -> None:
        vecs = self._embed(adapters)
        enc = self.encoder
        self.index.check_encoder(enc.spec, enc.version, enc.dim)
        for rec, v in zip(batch, vecs):
            rec["embedding"] = v
        self.index.upsert(batch)

    # -- reading -----------------------------------------------------------------------------
    def query(self, path: str | os.PathLike, k: int = 10, threshold: float | None = None,
              rerank: int | None = None) -> dict:
        """The ``k`` adapters most like the one at ``path`` (same family only), exactly re-scored.

        ``rerank``: how many FAISS candidates to re-score by the exact ΔW cosine (default
        max(2k, 20); 0 turns re-ranking off and scores are embedding cosines).
        """
        from lorasearch.adapters import load_adapter
        from lorasearch.similarity import delta_cosine, delta_norm

        if k < 1:
            raise LorasearchError("k must be at least 1")
        path = Path(path)
        if not path.exists():
            raise MissingError(f"{path}: no such file or directory")
        adapter = load_adapter(path)
        qvec = self._embed([adapter])
        enc = self.encoder
        recorded = self.index.encoder_spec()
        if recorded is not None:
            self.index.check_encoder(enc.spec, enc.version, enc.dim)
        n_rerank = max(2 * k, 20) if rerank is None else rerank
        hits = self.index.search(qvec, adapter.family, max(k, n_rerank))[0] if recorded else []
        qnorm = delta_norm(adapter)
        results = []
        for rank_pos, (rid, emb_score) in enumerate(hits):
            rec = self.index.get(rid)
            if rec is None:
                continue
            item = {"id": rid, "path": rec["path"], "family": rec["family"], "format": rec["format"],
                    "sha256": rec["sha256"], "embedding_score": round(float(emb_score), 6),
                    "score": float(emb_score), "reranked": False, "match": "similar"}
            if rec["sha256"] == adapter.sha256:
                item.update(score=1.0, match="exact", reranked=True)
            elif rank_pos < n_rerank:
                other = self._load_indexed(rec)
                if other is not None:
                    cos = float(delta_cosine(adapter, other))
                    item.update(score=cos, reranked=True)
                    onorm = rec.get("delta_norm") or delta_norm(other)
                    if cos >= SAME_UPDATE_COSINE and qnorm > 0 and \
                            abs(onorm / qnorm - 1.0) <= SAME_UPDATE_NORM_TOL:
                        item["match"] = "same-update"
            results.append(item)
        order = {"exact": 0, "same-update": 1, "similar": 2}
        results.sort(key=lambda r: (order[r["match"]], -r["score"]))
        if threshold is not None:
            results = [r for r in results if r["score"] >= threshold]
        results = results[:k]
        for i, r in enumerate(results, 1):
            r["rank"] = i
            r["score"] = round(r["score"], 6)
        return {
            "version": JSON_VERSION,
            "query": {"path": str(path), "sha256": adapter.sha256, "format": adapter.format,
                      "family": adapter.family, "n_modules": len(adapter.modules),
                      "encoder": enc.spec, "k": k, "threshold": threshold},
            "results": [{key: r[key] for key in ("rank", "id", "path", "score", "match", "embedding_score",
                                                  "reranked", "family", "format", "sha256")} for r in results],
        }

    def _load_indexed(self, rec: dict):
        """Load an indexed adapter for exact re-scoring, only if it is still the file we indexed."""
        from lorasearch.adapters import load_adapter

        p = Path(rec["path"])
        try:
            if stat_adapter(p) != (rec["size"], rec["mtime_ns"]):
                return None
            return load_adapter(p)
        except (LorasearchError, OSError):
            return None

    def stats(self) -> dict:
        out = {"version": JSON_VERSION, "index": str(self.path)}
        out.update(self.index.stats())
        return out

    # -- watching ----------------------------------------------------------------------------
    def watch(self, root: str | os.PathLike, interval: float = 2.0, prune: bool = True,
              stop: Callable[[], bool] | None = None,
              on_report: Callable[[SyncReport], None] | None = None) -> None:
        """Poll ``root`` and index adapters as they appear, change or disappear.

        A file is read only once its (size, mtime) has been the same for two consecutive polls,
        so a file still being written (copy, download) is never read half-way; a file that then
        fails to parse is retried when it changes again. Polling, not inotify: it works the same
        on network file systems and in containers, and the cost is one stat per adapter.
        """
        from lorasearch.adapters import find_adapters

        root = Path(root)
        if not root.is_dir():
            raise MissingError(f"{root}: not a directory")
        seen: dict[str, tuple[int, int]] = {}
        failed: dict[str, tuple[int, int]] = {}
        while True:
            current: dict[str, tuple[int, int]] = {}
            for p in find_adapters(root):
                try:
                    current[str(p.resolve())] = stat_adapter(p.resolve())
                except OSError:
                    continue
            stable = [Path(p) for p, st in current.items()
                      if seen.get(p) == st and failed.get(p) != st]
            report = self._sync(stable, progress=False) if stable else SyncReport()
            for p, _msg in report.errors:
                if p in current:
                    failed[p] = current[p]
            if prune:
                under = str(root.resolve())
                gone = [r["path"] for r in self.index.records()
                        if (r["path"] + os.sep).startswith(under + os.sep) and r["path"] not in current]
                if gone:
                    with self.index.writer():
                        self.index.remove(gone)
                    report.removed.extend(gone)
            if on_report and (report.added or report.updated or report.removed or report.errors):
                on_report(report)
            seen = current
            if stop is not None and stop():
                return
            time.sleep(interval)


def _progress(total: int, desc: str, enabled: bool | None):
    """A tqdm bar on a terminal only (stderr), a no-op object otherwise."""
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="adapter", disable=not enabled, file=sys.stderr)
