"""Ranking metrics for the query/gallery protocol, with binary relevance.

Every function takes one query's ranking as a list of 0/1 relevances, best first, and the
number of relevant gallery items ``n_relevant`` (it defaults to the count in the list, which
is right only when the list is the whole ranking). Definitions follow W2T's retrieval code:

    DCG@k   = Σ_{i=1..k} rel_i / log2(i + 1)
    IDCG@k  = Σ_{i=1..min(R, k)} 1 / log2(i + 1)            (R = n_relevant)
    NDCG@k  = DCG@k / IDCG@k
    Hit@k   = 1 if any rel_i = 1 for i ≤ k else 0
    Recall@k = (Σ_{i≤k} rel_i) / R
    AP@k    = (1 / min(R, k)) · Σ_{i=1..k} P@i · rel_i,      P@i = (Σ_{j≤i} rel_j) / i
    MRR     = 1 / (rank of the first relevant item), 0 if none is ranked

AP@k divides by min(R, k), not by the relevant items retrieved, so a ranking that finds one
relevant item at rank 1 out of R = 5 scores 1/5, not 1; mAP@k is its mean over queries.
A query with R = 0 has no defined value: callers drop it and report how many they dropped.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

METRIC_NAMES = ("ndcg@10", "hit@1", "map@10", "recall@10", "mrr")


def _prep(rels: Sequence[float], n_relevant: int | None) -> tuple[np.ndarray, int]:
    r = np.asarray(rels, dtype=np.float64).ravel()
    if r.size and not np.all((r == 0) | (r == 1)):
        raise ValueError("relevances must be 0 or 1 (binary gains)")
    n_rel = int(r.sum()) if n_relevant is None else int(n_relevant)
    if n_rel < int(r.sum()):
        raise ValueError(f"n_relevant={n_rel} is smaller than the relevant items in the ranking")
    if n_rel <= 0:
        raise ValueError("query has no relevant item: metric undefined")
    return r, n_rel


def dcg_at_k(rels: Sequence[float], k: int = 10) -> float:
    r = np.asarray(rels, dtype=np.float64).ravel()[:k]
    return float(np.sum(r / np.log2(np.arange(2, r.size + 2))))


def ndcg_at_k(rels: Sequence[float], k: int = 10, n_relevant: int | None = None) -> float:
    r, n_rel = _prep(rels, n_relevant)
    ideal = dcg_at_k(np.ones(min(n_rel, k)), k)
    return dcg_at_k(r, k) / ideal


def hit_at_k(rels: Sequence[float], k: int = 1, n_relevant: int | None = None) -> float:
    r, _ = _prep(rels, n_relevant)
    return float(r[:k].any())


def recall_at_k(rels: Sequence[float], k: int = 10, n_relevant: int | None = None) -> float:
    r, n_rel = _prep(rels, n_relevant)
    return float(r[:k].sum() / n_rel)


def average_precision_at_k(rels: Sequence[float], k: int = 10, n_relevant: int | None = None) -> float:
    r, n_rel = _prep(rels, n_relevant)
    top = r[:k]
    prec = np.cumsum(top) / np.arange(1, top.size + 1)
    return float(np.sum(prec * top) / min(n_rel, k))


def reciprocal_rank(rels: Sequence[float], n_relevant: int | None = None) -> float:
    r, _ = _prep(rels, n_relevant)
    hits = np.flatnonzero(r)
    return float(1.0 / (hits[0] + 1)) if hits.size else 0.0


def query_metrics(rels: Sequence[float], n_relevant: int | None = None, k: int = 10) -> dict[str, float]:
    """All metrics of one query; keys are ``METRIC_NAMES`` (with ``k`` in place of 10)."""
    return {
        f"ndcg@{k}": ndcg_at_k(rels, k, n_relevant),
        "hit@1": hit_at_k(rels, 1, n_relevant),
        f"map@{k}": average_precision_at_k(rels, k, n_relevant),
        f"recall@{k}": recall_at_k(rels, k, n_relevant),
        "mrr": reciprocal_rank(rels, n_relevant),
    }


def chance_metrics(n_relevant: int, n_ranked: int, k: int = 10) -> dict[str, float]:
    """Expected metrics of a uniformly random ranking of ``n_ranked`` items, ``n_relevant`` relevant.

    Each position is relevant with probability p = R/N, and two positions both are with
    q = R(R−1)/(N(N−1)); hence E[DCG@k] = p·Σ_{i≤k} 1/log2(i+1), E[Hit@1] = p,
    E[Recall@k] = min(k, N)/N, E[AP@k] = (1/min(R,k))·Σ_{i≤k} (p + (i−1)·q)/i, E[MRR] = Σ_i P(first hit at i)/i.
    """
    R, N = int(n_relevant), int(n_ranked)
    if R <= 0 or N < R:
        raise ValueError("need 0 < n_relevant <= n_ranked")
    p = R / N
    q = R * (R - 1) / (N * (N - 1)) if N > 1 else 0.0
    kk = min(k, N)
    i = np.arange(1, kk + 1)
    ideal = dcg_at_k(np.ones(min(R, k)), k)
    # P(first relevant at rank i) = Π_{j<i} (N−R−j+1)/(N−j+1) · R/(N−i+1)
    miss = np.concatenate([[1.0], np.cumprod((N - R - np.arange(N - R)) / (N - np.arange(N - R)))])
    first = np.array([miss[j - 1] * R / (N - j + 1) for j in range(1, N - R + 2)])
    return {
        f"ndcg@{k}": float(p * np.sum(1 / np.log2(i + 1)) / ideal),
        "hit@1": p,
        f"map@{k}": float(np.sum((p + (i - 1) * q) / i) / min(R, k)),
        f"recall@{k}": kk / N,
        "mrr": float(np.sum(first / np.arange(1, first.size + 1))),
    }


def rank_by_score(scores: np.ndarray, valid: np.ndarray | None = None,
                  relevant: np.ndarray | None = None) -> np.ndarray:
    """Gallery indices by descending score; invalid ones are dropped.

    Ties are broken pessimistically when ``relevant`` is given (non-relevant items first among
    equal scores), else by gallery order. Why: a method earns no credit for an order it did not
    produce. RawCos, for one, scores exactly 0 for every pair whose factor shapes differ (other
    ranks), and breaking those ties by input order would make its numbers depend on how the
    gallery folder happens to be sorted (here: by name, names starting with the label).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if relevant is None:
        order = np.argsort(-scores, kind="stable")
    else:
        order = np.lexsort((np.asarray(relevant, dtype=np.int8), -scores))
    if valid is not None:
        order = order[np.asarray(valid, dtype=bool)[order]]
    return order


def evaluate_scores(scores: np.ndarray, relevant: np.ndarray, valid: np.ndarray | None = None,
                    k: int = 10) -> list[dict[str, float] | None]:
    """Per-query metrics from a ``[n_query, n_gallery]`` score matrix.

    ``relevant[q, g]`` is True when gallery item g is relevant to query q; ``valid[q, g]``
    False excludes the pair entirely (e.g. different base-model family). A query with no
    relevant valid item gets ``None``.
    """
    scores = np.asarray(scores)
    relevant = np.asarray(relevant, dtype=bool)
    valid = np.ones_like(relevant) if valid is None else np.asarray(valid, dtype=bool)
    out: list[dict[str, float] | None] = []
    for q in range(scores.shape[0]):
        n_rel = int((relevant[q] & valid[q]).sum())
        if n_rel == 0:
            out.append(None)
            continue
        order = rank_by_score(scores[q], valid[q], relevant[q])
        # the whole ranking: the @k metrics cut it themselves, MRR needs the first hit anywhere
        out.append(query_metrics(relevant[q, order].astype(np.float64), n_rel, k))
    return out


def aggregate(per_query: Iterable[dict[str, float] | None]) -> dict[str, float]:
    """Mean of each metric over the defined queries; ``n`` counts them, ``n_undefined`` the rest."""
    rows = list(per_query)
    defined = [m for m in rows if m is not None]
    out: dict[str, float] = {}
    if defined:
        for key in defined[0]:
            out[key] = float(np.mean([m[key] for m in defined]))
    out["n"] = len(defined)
    out["n_undefined"] = len(rows) - len(defined)
    return out


def aggregate_by(per_query: Sequence[dict[str, float] | None], keys: Sequence) -> dict[str, dict[str, float]]:
    """``aggregate`` within each group of queries sharing a key (label, shot count …)."""
    groups: dict[str, list] = defaultdict(list)
    for m, key in zip(per_query, keys):
        groups[str(key)].append(m)
    return {key: aggregate(groups[key]) for key in sorted(groups, key=_natural)}


def _natural(key: str):
    try:
        return (0, float(key), key)
    except ValueError:
        return (1, 0.0, key)
