"""Query: embed one adapter, search its family in FAISS, re-score the top candidates exactly.

Candidates are re-scored by the Frobenius cosine of ΔW computed from the factors (DESIGN
decision 3): from the re-rank record stored at index time (``rerank.rescore``), or from the
candidate's file (``rerank.factor_cosines``) when there is none or it cannot decide; the hit's ``match`` says what was found:
``exact`` (same bytes), ``same-update`` (same ΔW: cosine ≥ 0.999 and the same norm, or — when
one side's alpha is unknown — the same direction, flagged ``scale_known: false``), ``similar``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from pathlib import Path

from lorasearch.errors import BadAdapterError, LorasearchError, MissingError, UsageError
from lorasearch.ingest import adapter_root, is_peft_folder, stat_adapter
from lorasearch.results import MATCH_ORDER, Hit, QueryInfo, QueryResult

SAME_UPDATE_COSINE = 0.999   # issue 2: "the same ΔW … cosine ≥ 0.999"
SAME_UPDATE_NORM_TOL = 0.01  # and the same size: a ΔW scaled ×2 is a different update
RERANK_FACTOR, RERANK_MIN = 5, 50   # default re-ranking depth: max(5k, 50) candidates …
RERANK_BYTES = 512 * 1024 * 1024    # … whose files add up to at most this many bytes (candidates
                                    # without a stored re-rank record only: records need no file)
REREAD_MAX = 5   # "undecided" candidates (a truncated record cannot prove same-update) re-read per query
TIE_MARGIN = 8                      # extra candidates so results do not depend on a store's tie order


def default_rerank_depth(k: int) -> int:
    return max(RERANK_FACTOR * k, RERANK_MIN)


def ranking_weight(encoder, family: str | None = None) -> float:
    """How much the encoder's own cosine counts in the order of ``similar`` results (issue 11).

    0 for a training-free encoder (sketch, baselines): the exact ΔW cosine decides the order, as the
    embedding only approximates it. A learned encoder (one loaded from a checkpoint, ``.config``)
    learned an order dense cosine does not know, so its order is kept: the weight ``w`` of the fusion
    ``w·encoder + (1−w)·exact`` recorded in its config (``retrieval.fusion_weight``, chosen on
    validation data), else 1 (the encoder's order alone). Match kinds always come from the exact cosine.
    An encoder that routes by family (``auto``) answers for the query's ``family``."""
    per_family = getattr(encoder, "ranking_weight_for", None)
    if per_family is not None and family is not None:
        return per_family(family)
    config = getattr(encoder, "config", None)
    if not isinstance(config, dict):
        return 0.0
    w = (config.get("retrieval") or {}).get("fusion_weight", 1.0)
    try:
        w = float(w)
    except (TypeError, ValueError):
        return 1.0
    return min(max(w, 0.0), 1.0) if math.isfinite(w) else 1.0


def fused_score(embedding, exact, w: float):
    """The ranking score of a re-scored candidate: ``w·embedding + (1−w)·exact`` (numbers or arrays)."""
    return exact if w == 0.0 else w * embedding + (1.0 - w) * exact


class _QuietFilter(logging.Filter):
    """Drops the reader's records logged by a thread inside ``quiet_reader`` (thread-local, so a
    concurrent ingest in the same process, e.g. under the HTTP service, keeps its warnings)."""

    state = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.state, "quiet", False)


_READER_LOG = logging.getLogger("lorasearch.adapters")
_FILTER = _QuietFilter()
_READER_LOG.addFilter(_FILTER)


@contextlib.contextmanager
def quiet_reader():
    """Silence the reader's warnings while candidates are re-loaded: warnings about files that are
    not the query were shown when they were indexed (and ``info`` shows them), not on every query."""
    before = getattr(_FILTER.state, "quiet", False)
    _FILTER.state.quiet = True
    try:
        yield
    finally:
        _FILTER.state.quiet = before


def load_indexed(rec: dict):
    """Load an indexed adapter for exact re-scoring, only if it is still the file we indexed
    (same size and mtime; its sha256 is then the catalog's, so it is not hashed again)."""
    from lorasearch.adapters import load_adapter

    p = Path(rec["path"])
    try:
        if stat_adapter(p) != (rec["size"], rec["mtime_ns"]):
            return None
        with quiet_reader():
            return load_adapter(p, sha256=rec["sha256"])
    except (LorasearchError, OSError):
        return None
    except Exception:  # noqa: BLE001 -- a candidate that no longer reads is simply not re-scored
        return None


def _stored_records(index, ids: list[int]) -> dict:
    """``{id: RerankRecord}`` stored with the candidates, in one batched read; a store without
    records or an index built before them gives none, a corrupt blob none for that id."""
    from lorasearch.rerank import RerankRecord

    fetch = getattr(index, "rerank_blobs", None)
    if not ids or not callable(fetch):
        return {}
    out = {}
    for rid, blob in fetch(ids).items():
        try:
            out[rid] = RerankRecord.from_bytes(blob, where=f"re-rank record {rid}")
        except BadAdapterError:
            continue   # re-scored from its file instead
    return out


def _rescore_candidates(index, adapter, found, records, n_rerank, budget, q_scale_known):
    """The candidates as hits, the top ``n_rerank`` re-scored by the ΔW cosine: from the stored
    re-rank records (no file opened; exact for a lossless record, ± ``score_bound`` for a
    truncated one), else — no record, or a record whose bound straddles the same-update cosine
    ("undecided", at most REREAD_MAX per query) — from the candidate's file, exactly. Returns
    (hits, number of candidate files read)."""
    from lorasearch.rerank import factor_cosines, match_kind, rescore

    hits: list[Hit] = []
    top = [rid for pos, (rid, _s) in enumerate(found) if pos < n_rerank and rid in records
           and records[rid]["sha256"] != adapter.sha256]
    stored = _stored_records(index, top)
    from_record, from_file = [], []
    for rank_pos, (rid, emb_score) in enumerate(found):
        rec = records.get(rid)
        if rec is None:
            continue
        hit = Hit(rank=0, id=rid, path=rec["path"], score=float(emb_score), match="similar",
                  embedding_score=round(float(emb_score), 6), reranked=False, family=rec["family"],
                  format=rec["format"], sha256=rec["sha256"],
                  scale_known=q_scale_known and bool((rec.get("info") or {}).get("scale_known", True)),
                  ranks=[int(r) for r in rec.get("ranks") or []])
        if rec["sha256"] == adapter.sha256:
            hit.score, hit.match, hit.reranked = 1.0, "exact", True
        elif rid in stored:
            from_record.append((hit, stored[rid], rec))
        elif rank_pos < n_rerank and (budget is None or budget >= rec["size"]):
            budget = None if budget is None else budget - rec["size"]
            from_file.append((hit, rec))
        hits.append(hit)
    if from_record:
        qnorm, cosines, bounds, norms = rescore(adapter, [r for _h, r, _c in from_record])
        undecided = 0
        for (hit, _r, rec), cos, bnd, cnorm in zip(from_record, cosines, bounds, norms):
            kind = match_kind(float(cos), float(bnd), qnorm, float(cnorm), scale_known=hit.scale_known)
            # "undecided" is not proven the same update: "similar" unless its file (re-read below,
            # at most REREAD_MAX per query, and only if unchanged since indexing) decides otherwise
            hit.score, hit.reranked, hit.rescored_from = float(cos), True, "record"
            hit.score_bound = float(bnd)
            hit.match = "similar" if kind == "undecided" else kind
            if kind == "undecided" and undecided < REREAD_MAX:
                undecided += 1
                from_file.append((hit, rec))
    loaded = [(hit, rec, load_indexed(rec)) for hit, rec in from_file]
    loaded = [(hit, rec, other) for hit, rec, other in loaded if other is not None]
    if loaded:
        qnorm, cosines, norms = factor_cosines(adapter, [o for _h, _r, o in loaded],
                                               [r.get("delta_norm") for _h, r, _o in loaded])
        for (hit, _r, other), cos, onorm in zip(loaded, cosines, norms):
            hit.scale_known = hit.scale_known and bool(getattr(other, "scale_known", True))
            hit.score, hit.reranked, hit.rescored_from, hit.score_bound = float(cos), True, "file", 0.0
            hit.match = match_kind(float(cos), 0.0, qnorm, float(onorm), scale_known=hit.scale_known)
    return hits, len(from_file)


def _check_args(k: int, threshold: float | None, rerank: int | None) -> None:
    if k < 1:
        raise UsageError(f"k must be at least 1, not {k}")
    if threshold is not None and not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
        raise UsageError(f"threshold is a cosine and must be between -1 and 1, not {threshold}")
    if rerank is not None and rerank < 0:
        raise UsageError(f"rerank must be 0 or more, not {rerank}")


def load_query(path: str | os.PathLike):
    from lorasearch.adapters import load_adapter

    path = Path(path)
    if not path.exists():
        raise MissingError(f"{path}: no such file or directory")
    if path.is_dir() and not is_peft_folder(path):
        raise BadAdapterError(path, "is a folder without adapter_config.json; query one adapter file or PEFT folder")
    root = adapter_root(path)
    stat_adapter(root)   # refuses a FIFO/device before anything opens it
    return load_adapter(root)


def run_query(index, encoder, path: str | os.PathLike, k: int = 10, threshold: float | None = None,
              rerank: int | None = None, device: str = "auto") -> QueryResult:
    """The ``k`` adapters most like the one at ``path`` (same family only), exactly re-scored.

    Re-scoring reads each candidate's stored re-rank record (one batched read, bounded bytes per
    candidate, no file opened); ``score`` is then the exact ΔW cosine for a lossless record and
    the estimate from a truncated one, the exact cosine lying within ``score_bound`` of it. Only
    candidates without a record (an index built before records; the Milvus store) or whose bound
    leaves same-update undecided are re-scored from their files (``query.reread`` counts them).

    ``rerank``: how many FAISS candidates to re-score by the exact ΔW cosine. Default
    max(5k, 50), stopping early once the candidates' files add up to RERANK_BYTES (so a
    query over SDXL-sized files stays interactive); 0 turns re-ranking off and scores are
    embedding cosines. On the CPU language collection re-scoring the sketch's top 20/30/50
    gave NDCG@10 87.9/91.7/93.4 against 93.7 for exact search over everything.
    """
    _check_args(k, threshold, rerank)
    adapter = load_query(path)
    qvec, _qnorm = encoder.embed([adapter], device=device)   # the sketch: from the factors, no torch
    recorded = index.encoder_spec()
    if recorded is not None:
        index.check_encoder(encoder.spec, encoder.version, encoder.dim)
    q_scale_known = bool(getattr(adapter, "scale_known", True))
    n_rerank = default_rerank_depth(k) if rerank is None else rerank
    w = ranking_weight(encoder, adapter.family)
    budget = RERANK_BYTES if rerank is None else None   # an explicit --rerank N has no budget
    # TIE_MARGIN extra candidates: equal scores (identical ΔW) cut at k by one backend's order
    # and not another's would make results depend on the store; ties go to the smaller id below
    found = index.search(qvec, adapter.family, max(k, n_rerank) + TIE_MARGIN)[0] if recorded else []
    records = index.get_many([rid for rid, _s in found]) if found else {}   # one round trip
    hits, reread = _rescore_candidates(index, adapter, found, records, n_rerank, budget, q_scale_known)
    for hit in hits:          # the exact ΔW cosine decides match kinds; a learned encoder orders `similar`
        if hit.reranked:
            hit.exact_cosine = round(float(hit.score), 6)
            if hit.match == "similar":
                hit.score = float(fused_score(hit.embedding_score, float(hit.score), w))
    qpath = str(adapter_root(Path(path)).resolve())
    # re-scored candidates rank above any left out by the re-ranking budget (as eval's SPEC+rerank@N)
    hits.sort(key=lambda h: (MATCH_ORDER[h.match], not h.reranked, -round(h.score, 6), h.path != qpath, h.id))
    if threshold is not None:
        hits = [h for h in hits if h.score >= threshold]
    hits = hits[:k]
    for i, h in enumerate(hits, 1):
        h.rank, h.score = i, round(h.score, 6)
    if hits:                                               # the hits' labels: one batched lookup
        from lorasearch.indexer import tags

        labels = tags.labels_of(index, [h.id for h in hits])
        for h in hits:
            h.labels = labels.get(h.id, [])
    info = QueryInfo(path=str(path), sha256=adapter.sha256, format=adapter.format, family=adapter.family,
                     n_modules=len(adapter.modules), encoder=encoder.spec, k=k, threshold=threshold,
                     indexed_in_family=index.count(adapter.family), scale_known=q_scale_known,
                     reread=reread,
                     ranking="exact" if w == 0.0 else "encoder" if w == 1.0 else f"fusion w={w:g}")
    return QueryResult(info, hits)
