"""Bulk ingest on Ray: read → canonicalize → encode on Ray workers, one writer commits in order.

    index_dir_ray(ls, "./adapters")                      # a local Ray started on demand
    index_dir_ray(ls, "./adapters", address="ray://head:10001")   # or $RAY_ADDRESS: an existing cluster

The driver plans exactly as the single-process path (stat every file, skip unchanged ones by
(size, mtime) against the store's fingerprints), cuts the work into batches of about
``batch_bytes`` of adapter files, and submits one Ray task per batch, keeping a bounded number in
flight. Each task runs the facade's own per-file steps (``Lorasearch._ingest``: hash when indexed
before, ``load_adapter``, the record, then ``_flush``'s embed-in-batches with one-by-one retry)
against a collector instead of a store, so bad files are skipped with the very same messages. The
driver is the single writer: it takes the store's writer lock once and commits each batch's
records in submission order (ids come out as in a plain ``index``); every commit is acknowledged
on its own, so an interrupted run keeps what was committed and re-running skips it (resumable).
A batch whose task dies (worker lost, out of memory) is redone on the driver.

Ray tasks rather than Ray Data: the unit of work is a list of files whose result must come back
to one writer in order; tasks with a bounded in-flight window give exactly that, with less
machinery than a Dataset pipeline and no extra copy of the embeddings through its object store.
Workers import lorasearch themselves: on a cluster every node needs it installed (same version).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from lorasearch.errors import BadAdapterError, MissingError, UnavailableError

BATCH_BYTES = 64 * 1024 * 1024      # adapter bytes per task: big enough to amortize a task (~ms),
BATCH_MAX_FILES = 256               # small enough that 2 tasks per worker keep memory bounded


class _Collector:
    """Stands in for the store inside a worker: keeps what ``_ingest`` would have written."""

    def __init__(self, spec: str):
        self.spec = spec
        self.records: list[dict] = []
        self.touches: list[tuple[int, int, int, str]] = []   # (id, size, mtime_ns, path)

    def encoder_spec(self) -> str:
        return self.spec

    def check_encoder(self, spec, version, dim) -> None:   # the driver checks before committing
        return None

    def upsert(self, records) -> list[int]:
        self.records.extend(records)
        return []

    def touch(self, adapter_id, size=None, mtime_ns=None) -> bool:
        self.touches.append((adapter_id, size, mtime_ns))
        return True

    def rerank_blobs(self, ids) -> dict[int, bytes]:   # says "keeps re-rank records": ingest builds them
        return {}


class _NoBar:
    def update(self, _n=1) -> None:
        pass


def embed_batch(work: list, spec: str, device: str) -> dict:
    """One batch through the single-process path's per-file steps (``ingest.Sync._ingest``: hash
    when indexed before, ``load_adapter``, the record, then embed in batches with one-by-one
    retry); runs in a Ray worker (or on the driver). ``work`` items are ``Sync.plan``'s."""
    from lorasearch.encoders import get_encoder
    from lorasearch.ingest import Sync
    from lorasearch.results import SyncReport

    encoder = []
    collector = _Collector(spec)

    def get():
        if not encoder:
            encoder.append(get_encoder(spec, device=device))
        return encoder[0]

    report = SyncReport()
    Sync(collector, get, device)._ingest(work, report, _NoBar())
    path_of = {item[4][0]: str(item[0]) for item in work if item[4] is not None}
    touches = [(i, s, m, path_of[i]) for i, s, m in collector.touches]
    return {"records": collector.records, "touches": touches, "added": report.added,
            "updated": report.updated, "unchanged": report.unchanged, "errors": report.errors}


def _batches(work: list, batch_bytes: int, max_files: int = BATCH_MAX_FILES) -> list[list]:
    out, cur, size = [], [], 0
    for item in work:
        cur.append(item)
        size += int(item[2] or 0)
        if size >= batch_bytes or len(cur) >= max_files:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def start_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a small local Ray; returns
    ``(ray, started_here)``. A Ray that cannot be imported or reached → ``UnavailableError``."""
    try:
        import ray
    except ImportError:
        raise UnavailableError("--ray needs Ray: pip install 'lorasearch[ray]'") from None
    if ray.is_initialized():
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")    # a private local instance: no token notice
            ray.init(num_cpus=num_cpus or min(2, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 -- ray raises ConnectionError, RuntimeError, ValueError …
        where = address or "a local Ray"
        raise UnavailableError(f"cannot start or reach {where}: {' '.join(str(e).split())[:300]}") from None
    return ray, True


def index_dir_ray(ls, root, prune: bool = False, address: str | None = None, num_cpus: int | None = None,
                  batch_bytes: int = BATCH_BYTES, progress: bool | None = None):
    """``Lorasearch.index_dir`` with the reading and encoding spread over Ray workers."""
    from lorasearch.adapters import find_adapters
    from lorasearch.ingest import adapter_root, is_peft_folder, progress_bar, prune_missing

    root = Path(root)
    if not root.exists():
        raise MissingError(f"{root}: no such file or directory")
    paths = [adapter_root(root)] if root.is_file() or is_peft_folder(root) else find_adapters(root)
    report, work = plan(ls, paths)
    if work:
        enc = ls.encoder                         # resolve (and check) the encoder before any work
        ray, started = start_ray(address, num_cpus)
        try:
            _run(ls, ray, enc, work, report, batch_bytes, progress_bar(len(work), "indexing (ray)", progress))
        finally:
            if started:
                ray.shutdown()
    if prune:
        prune_missing(ls.index, root, {os.path.realpath(p) for p in paths}, report)
    return report


def plan(ls, paths: list[Path]):
    """Stat every path once and keep what changed since it was indexed (``ingest.Sync.plan``)."""
    return ls._sync().plan(paths)


def _run(ls, ray, enc, work: list, report, batch_bytes: int, bar) -> None:
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # a small job still gets ~4 batches per CPU (one 64 MiB batch of small files would use one worker)
    total = sum(int(item[2] or 0) for item in work)
    batches = _batches(work, max(1, min(batch_bytes, total // (4 * cpus))))
    task = ray.remote(num_cpus=1, max_retries=1)(embed_batch)
    window = 2 * cpus
    pending: list[tuple[list, object]] = []
    nxt = 0
    try:
        with ls.index.writer():
            while nxt < len(batches) or pending:
                while nxt < len(batches) and len(pending) < window:
                    pending.append((batches[nxt], task.remote(batches[nxt], enc.spec, "cpu")))
                    nxt += 1
                batch, ref = pending.pop(0)     # the oldest first: commits follow the file order
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError:
                    result = embed_batch(batch, enc.spec, ls.device)   # a lost task: redo it here
                _commit(ls, enc, result, report)
                bar.update(len(batch))
    except BaseException as e:
        for _batch, ref in pending:
            ray.cancel(ref, force=True)
        e.partial_report = report
        raise
    finally:
        bar.close()


def _commit(ls, enc, result: dict, report) -> None:
    """Write one batch's results; report only what the store acknowledged."""
    redo = []
    for adapter_id, size, mtime, path in result["touches"]:
        if not ls.index.touch(adapter_id, size=size, mtime_ns=mtime):
            redo.append(Path(path))         # removed by another writer meanwhile: index it again below
    report.unchanged.extend(p for p in result["unchanged"] if Path(p) not in redo)
    report.errors.extend(result["errors"])
    records = result["records"]
    if records:
        ls.index.check_encoder(enc.spec, enc.version, enc.dim)
        try:
            ls.index.upsert(records)
            done = records
        except BadAdapterError:             # the store refused one of them: find which, keep the rest
            done = []
            for rec in records:
                try:
                    ls.index.upsert([rec])
                    done.append(rec)
                except BadAdapterError as e:
                    report.errors.append((rec["path"], str(e)))
        ok = {r["path"] for r in done}
        report.added.extend(p for p in result["added"] if p in ok)
        report.updated.extend(p for p in result["updated"] if p in ok)
    if redo:
        sub = ls._sync().run(redo, progress=False)
        for name in ("added", "updated", "unchanged", "errors"):
            getattr(report, name).extend(getattr(sub, name))
