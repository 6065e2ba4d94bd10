"""Ingest: stat → scan → sync → flush → prune. The one way adapter files reach the index.

    stat      (size, mtime_ns) of a file or PEFT folder; refuses non-regular files (FIFOs,
              devices) before anything opens them
    sync      skip unchanged files; hash files whose stat moved; load → embed → upsert the rest,
              in batches, one bad file costing only itself (also on an unexpected exception)
    prune     drop index entries whose file (or the symlink it was seen through) is gone

Catalog lookups of known paths go through ``known_fingerprints`` only, and embedding through
``embed`` only, so a faster store lookup or encoder path drops in at one place.
"""
from __future__ import annotations

import os
import stat as stat_mod
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from lorasearch.errors import BadAdapterError, LorasearchError, MissingError
from lorasearch.results import SyncReport

EMBED_BATCH = 16
RERANK_BUDGET = None   # bytes of factor payload per re-rank record; None: rerank.DEFAULT_BUDGET (2 MiB)

_KINDS = ((stat_mod.S_ISFIFO, "a FIFO (named pipe)"), (stat_mod.S_ISCHR, "a character device"),
          (stat_mod.S_ISBLK, "a block device"), (stat_mod.S_ISSOCK, "a socket"))


# ---- paths and stat ---------------------------------------------------------------------------
def adapter_root(path: Path) -> Path:
    """The path an adapter is known by: a PEFT folder's ``adapter_model.safetensors`` is its folder
    (the folder's config holds alpha, and the index keys PEFT adapters by folder)."""
    path = Path(path)
    if path.name == "adapter_model.safetensors" and (path.parent / "adapter_config.json").is_file():
        return path.parent
    return path


def is_peft_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _refuse_special(path: Path, st: os.stat_result) -> None:
    if not stat_mod.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise BadAdapterError(path, f"is {kind}, not a regular file; refused without opening it")


def stat_adapter(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of an adapter file, or of a PEFT folder's files taken together.

    Only ``stat`` is called (never ``open``): a FIFO or device named like an adapter is refused
    here with a reason, so nothing later blocks on it while holding the writer lock."""
    path = Path(path)
    st = path.stat()
    if stat_mod.S_ISDIR(st.st_mode):
        size, mtime = 0, 0
        for p in sorted(path.iterdir()):
            pst = p.stat()
            if p.name.startswith(("adapter_model.", "adapter_config.")):
                _refuse_special(p, pst)
            if stat_mod.S_ISREG(pst.st_mode):
                size += pst.st_size
                mtime = max(mtime, pst.st_mtime_ns)
        return size, mtime
    _refuse_special(path, st)
    return st.st_size, st.st_mtime_ns


def scan(paths: Iterable[Path]) -> dict[str, tuple[int, int]]:
    """``{real path: (size, mtime_ns)}`` of the given adapters; unreadable or special ones are left out."""
    current: dict[str, tuple[int, int]] = {}
    for p in paths:
        key = os.path.realpath(p)
        try:
            current[key] = stat_adapter(Path(key))
        except (OSError, BadAdapterError):
            continue
    return current


# ---- the catalog, looked up in one place ------------------------------------------------------
def known_fingerprints(index, keys: list[str]) -> dict[str, tuple]:
    """``{path: (id, size, mtime_ns, sha256, family)}`` for the indexed ones among ``keys``."""
    lookup = getattr(index, "fingerprints_for", None)
    if lookup is not None:
        return lookup(keys)
    everything = index.fingerprints()
    return {k: everything[k] for k in keys if k in everything}


def indexed_under(index, folder: str | os.PathLike) -> list[str]:
    """Indexed paths equal to ``folder`` or inside it (real paths)."""
    under = os.path.realpath(folder)
    prefix = under.rstrip(os.sep) + os.sep
    return sorted(p for p in index.fingerprints() if p == under or p.startswith(prefix))


def seen_as(index, folder: str | os.PathLike) -> list[str]:
    """Indexed paths last seen through a symlink inside ``folder`` (their real path is elsewhere)."""
    prefixes = {os.path.abspath(folder).rstrip(os.sep) + os.sep, os.path.realpath(folder).rstrip(os.sep) + os.sep}
    out = []
    for rec in index.records():
        alias = (rec.get("info") or {}).get("seen_as")
        if alias and alias != rec["path"] and any(alias.startswith(p) for p in prefixes):
            out.append(rec["path"])
    return sorted(out)


# ---- embedding, in one place ------------------------------------------------------------------
def embed(encoder, adapters: list, device: str = "auto") -> tuple[np.ndarray, list[float]]:
    """Embeddings and ‖ΔW‖_F of each adapter. An encoder with its own ``embed(adapters, device)``
    (straight from the factors) is used as is; otherwise canonical form → ``encode``, the norm
    coming free from the canonical σ (similarity.delta_norm on the raw factors costs seconds for an
    SD adapter)."""
    own = getattr(encoder, "embed", None)
    if callable(own):
        return own(adapters, device)
    from lorasearch.canonical import canonicalize_many

    canon = canonicalize_many(adapters, device=device)
    norms = [float(np.sqrt(sum(float(np.sum(np.asarray(m.sigma, np.float64) ** 2)) for m in c.modules)))
             for c in canon]
    return encoder.encode(canon), norms


def rerank_blob(adapter) -> bytes | None:
    """The adapter's compact re-rank record (``lorasearch.rerank``), serialized; None when it cannot
    be built (the query then re-reads that candidate's file, as for an index without records)."""
    from lorasearch.rerank import DEFAULT_BUDGET, build_record

    try:
        return build_record(adapter, RERANK_BUDGET or DEFAULT_BUDGET).to_bytes()
    except Exception:  # noqa: BLE001 -- a record is an optimization; its absence is handled at query time
        return None


# ---- sync -------------------------------------------------------------------------------------
def internal_error(path, e: BaseException) -> str:
    """One line for an exception no reader rule anticipated; the traceback with LORASEARCH_DEBUG=1."""
    if os.environ.get("LORASEARCH_DEBUG"):
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    msg = " ".join(str(e).split())[:200] or "(no message)"
    return f"{path}: internal error ({type(e).__name__}: {msg}); please report it"


def _error_line(path, e: BaseException) -> str:
    if isinstance(e, LorasearchError):
        return str(e)
    if isinstance(e, OSError):
        return f"{path}: {e.strerror or e}"
    return internal_error(path, e)


class Sync:
    """One ingest run against an open index. ``get_encoder`` is called only when work is found
    (and before the writer lock is taken)."""

    def __init__(self, index, get_encoder: Callable[[], object], device: str = "auto"):
        self.index, self.get_encoder, self.device = index, get_encoder, device

    def run(self, paths: list[Path], progress: bool | None = None,
            stats: dict[str, tuple[int, int]] | None = None) -> SyncReport:
        """stat → (skip | [hash if indexed before →] (touch | load → embed → upsert)).

        Paths are keyed by their real path, so a symlink and its target (or two links to one file)
        are one adapter. Only what reached the catalog is reported as added/updated: if the run is
        interrupted, the exception carries ``partial_report`` with what was kept. ``stats``: the
        (size, mtime_ns) already taken by ``watch``'s scan, keyed by real path (not stat'ed again).
        """
        report, work = self.plan(paths, stats)
        if not work:
            return report
        self.get_encoder()   # resolve (and check) the encoder before taking the lock
        bar = progress_bar(len(work), "indexing", progress)
        try:
            with self.index.writer():
                self._ingest(work, report, bar)
        except BaseException as e:
            e.partial_report = report
            raise
        finally:
            bar.close()
        return report

    def plan(self, paths: list[Path], stats: dict[str, tuple[int, int]] | None = None):
        """``(report, work)``: unchanged and un-stat-able files already in ``report``; ``work`` the
        ``(real path, path as given, size, mtime_ns, old fingerprint or None)`` left to read."""
        report = SyncReport()
        todo: dict[str, Path] = {}
        for p in paths:
            todo.setdefault(os.path.realpath(p), Path(p))
        known = known_fingerprints(self.index, list(todo))
        work: list[tuple[Path, str, int, int, tuple | None]] = []
        for key, given in todo.items():
            try:
                size, mtime = stats[key] if stats is not None and key in stats else stat_adapter(Path(key))
            except BadAdapterError as e:
                report.errors.append((str(given), f"{given}: {e.reason}"))
                continue
            except Exception as e:  # noqa: BLE001 -- OSError, or anything odd: one line for this file
                report.errors.append((str(given), _error_line(given, e)))
                continue
            old = known.get(key)
            if old is not None and old[1] == size and old[2] == mtime:
                report.unchanged.append(key)
            else:
                work.append((Path(key), os.path.abspath(given), size, mtime, old))
        return report, work

    def _ingest(self, work: list, report: SyncReport, bar) -> None:
        from lorasearch.adapters import adapter_sha256, load_adapter

        pending: list[tuple[dict, object, bool]] = []   # (record, adapter, was it indexed before)
        for resolved, alias, size, mtime, old in work:
            try:
                sha = None
                if old is not None:
                    sha = adapter_sha256(resolved)
                    # same bytes, only the timestamp moved: refresh stat, keep the vector (unless
                    # another writer removed the record since `known` was read: then index it again)
                    if old[3] == sha and self.index.touch(old[0], size=size, mtime_ns=mtime):
                        report.unchanged.append(str(resolved))
                        bar.update(1)
                        continue
                # a new file is hashed by load_adapter itself, overlapped with parsing (one read)
                adapter = load_adapter(resolved, sha256=sha)
                pending.append((record(adapter, resolved, size, mtime, alias), adapter, old is not None))
            except Exception as e:  # noqa: BLE001 -- one file, however odd, costs only itself
                report.errors.append((str(resolved), _error_line(resolved, e)))
                bar.update(1)
                continue
            if len(pending) >= EMBED_BATCH:
                self.flush(pending, report)
                bar.update(len(pending))
                pending = []
        if pending:
            self.flush(pending, report)
            bar.update(len(pending))

    def flush(self, pending: list, report: SyncReport) -> None:
        """Embed and upsert one batch; if the batch fails, retry one by one so one adapter the
        canonicalizer/encoder rejects costs only itself."""
        try:
            vecs, norms = embed(self.get_encoder(), [a for _r, a, _o in pending], self.device)
        except Exception as e:  # noqa: BLE001 -- e.g. torch's LinAlgError on factors whose product overflows
            if len(pending) == 1:
                path = pending[0][0]["path"]
                if isinstance(e, LorasearchError):
                    msg = str(e)
                elif isinstance(e, (RuntimeError, ValueError)):
                    msg = f"{path}: cannot canonicalize or embed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                else:
                    msg = internal_error(path, e)
                report.errors.append((path, msg))
            else:
                for item in pending:
                    self.flush([item], report)
            return
        enc = self.get_encoder()
        self.index.check_encoder(enc.spec, enc.version, enc.dim)
        for (rec, _a, _o), v, n in zip(pending, vecs, norms):
            rec["embedding"], rec["delta_norm"] = v, n
        if callable(getattr(self.index, "rerank_blobs", None)):   # a store that keeps re-rank records
            for rec, adapter, _o in pending:
                blob = rerank_blob(adapter)
                if blob is not None:
                    rec["rerank"] = blob
        try:
            self.index.upsert([rec for rec, _a, _o in pending])
        except BadAdapterError as e:     # a store refused a record (e.g. a path over Milvus's limit)
            if len(pending) == 1:
                report.errors.append((pending[0][0]["path"], str(e)))
            else:                        # validated before anything was written: retry one by one
                for item in pending:
                    self.flush([item], report)
            return
        for rec, _a, was_indexed in pending:           # acknowledged: the transaction committed
            (report.updated if was_indexed else report.added).append(rec["path"])


def record(adapter, path: Path, size: int, mtime: int, alias: str | None = None) -> dict:
    """The catalog row of an adapter (``embedding`` and ``delta_norm`` are set by ``flush``).

    ``info`` also keeps ``seen_as`` (the path the file was found under, which differs from the
    real path for a symlink: ``--prune`` needs it) and ``scale_known`` (False when alpha is unknown)."""
    from lorasearch.adapters import describe

    info = describe(adapter, modules=False)   # `info` rebuilds the per-module table on demand
    info.pop("modules", None)
    info["seen_as"] = alias or str(path)
    info["scale_known"] = bool(getattr(adapter, "scale_known", True))
    return {
        "path": str(path), "sha256": adapter.sha256, "size": size, "mtime_ns": mtime,
        "format": adapter.format, "family": adapter.family,
        "ranks": sorted({m.rank for m in adapter.modules}), "n_modules": len(adapter.modules),
        "metadata": adapter.metadata, "info": info,
    }


# ---- the commands -----------------------------------------------------------------------------
def index_dir(sync: Sync, root: str | os.PathLike, prune: bool = False, progress: bool | None = None) -> SyncReport:
    """Index every adapter under ``root``; skip unchanged files; optionally prune deleted ones.
    ``root`` may also be a single adapter file or PEFT folder (then only it is indexed/pruned)."""
    from lorasearch.adapters import find_adapters

    root = Path(root)
    if not root.exists():
        raise MissingError(f"{root}: no such file or directory")
    single = root.is_file() or is_peft_folder(root) or not root.is_dir()
    paths = [adapter_root(root)] if single else find_adapters(root)
    report = sync.run(paths, progress=progress)
    if prune:
        prune_missing(sync.index, root, {os.path.realpath(p) for p in paths}, report)
    return report


def prune_missing(index, root: Path, present: set[str], report: SyncReport,
                  also: Iterable[str] = ()) -> None:
    """Remove indexed adapters under ``root`` (or ``root`` itself, or seen through a symlink in it)
    that are not in ``present``; ``also``: more candidate paths (watch passes its previous scan)."""
    candidates = set(indexed_under(index, root)) | set(also)
    if Path(root).is_dir() and not also:
        candidates |= set(seen_as(index, root))
    gone = sorted(p for p in candidates - present if index.by_path(p) is not None)
    if gone:
        with index.writer():
            index.remove(gone)
        report.removed.extend(gone)


def add(sync: Sync, paths: Iterable[str | os.PathLike], progress: bool | None = None) -> SyncReport:
    """Add or refresh adapter files and PEFT folders; a plain folder adds every adapter under it."""
    from lorasearch.adapters import find_adapters

    todo = []
    errors = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            errors.append((str(p), f"{p}: no such file or directory"))
        elif p.is_dir() and not is_peft_folder(p):
            found = find_adapters(p)
            if not found:
                errors.append((str(p), f"{p}: no adapters in this folder"))
            todo.extend(found)
        else:
            todo.append(adapter_root(p))
    report = sync.run(todo, progress=progress)
    report.errors = errors + report.errors
    return report


def progress_bar(total: int, desc: str, enabled: bool | None):
    """A tqdm bar on a terminal only (stderr), a no-op object otherwise."""
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="adapter", disable=not enabled, file=sys.stderr)
