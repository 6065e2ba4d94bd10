"""Audit a collection from its weights: duplicate clusters, merge provenance, labels from neighbours.

Plain functions over the ``Lorasearch`` facade (``lorasearch.api``) or its ``LoraIndex``, so a
facade method is one line (``def dedupe(self, **kw): return audit.dedupe(self, **kw)``):

- :func:`dedupe`  every pair of indexed adapters that is ``exact`` (same bytes) or ``same-update``
  (exact ΔW cosine ≥ 0.999 and ‖ΔW‖ within 1 %, the rule ``query`` uses), joined into clusters.
  Candidate pairs come from the index (each adapter's neighbours above an embedding-cosine bound,
  N·k searches, not N² pairs) and are then verified by the exact ΔW cosine from the factors.
- :func:`explain` the query's ΔW as a non-negative combination Σ cᵢ ΔWᵢ of its top indexed
  candidates: NNLS on the exact Gram matrix (``lorasearch.gram``), coefficients, explained share
  of ‖ΔW‖², residual and a one-line verdict.
- :func:`label`   similarity-weighted kNN over labelled neighbours (labels from ``indexer.tags``),
  with the neighbours as evidence and an abstention when they are far or disagree.
- :func:`tag` / :func:`untag` / :func:`label_counts`  attach, detach and count labels.

Each returns a typed result of ``lorasearch.results`` (one JSON envelope for CLI, API and HTTP).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from lorasearch import gram as G
from lorasearch.errors import BadAdapterError, MissingError, UsageError
# one source of truth with `query`: the same-update rule (exact ΔW cosine and norm), the loaders
from lorasearch.query import SAME_UPDATE_COSINE, SAME_UPDATE_NORM_TOL, load_indexed, load_query
from lorasearch.results import (JSON_VERSION, DedupeResult, ExplainResult, LabelResult,  # noqa: F401
                                LabelsResult, TagResult, UntagResult)

DEDUPE_K = 10                    # neighbours searched per adapter (doubled while all are above the bound)
DEDUPE_BOUND = 0.9               # embedding cosine above which a pair is verified exactly
EXPLAIN_K = 20
MERGE_EXPLAINED = 0.98           # ≥ this share of ‖ΔW‖² explained: a merge (or a rescaled copy)
PARTLY_EXPLAINED = 0.5           # below this: "not a merge of indexed adapters"
MIN_SOURCE_SHARE = 0.01          # sources contributing less than 1 % of ‖ΔW‖² are not named in the verdict
LABEL_K = 10
LABEL_MIN_SIMILARITY = 0.08      # nearest labelled neighbour less similar than this: abstain ("far")
LABEL_MIN_AGREEMENT = 0.6        # winning label's weighted vote share below this: abstain ("disagree")
# precision order for the copy to keep (more mantissa bits first: fp16 keeps 10, bf16 7)
_PRECISION = {"F64": 0, "F32": 1, "F16": 2, "BF16": 3}


def _index_of(ls):
    """The ``LoraIndex`` of a facade, or the index itself."""
    return getattr(ls, "index", ls)


class _FactorCache:
    """LRU of loaded adapters' factors (an SDXL adapter's factors are ~100 MB in float64)."""

    def __init__(self, load: Callable[[int], object], size: int = 64):
        self.load, self.size = load, size
        self._d: OrderedDict[int, dict | None] = OrderedDict()
        self.scale_known: dict[int, bool] = {}        # False: the file has no alpha (norm not comparable)

    def __call__(self, i: int) -> dict | None:
        if i in self._d:
            self._d.move_to_end(i)
            return self._d[i]
        ad = self.load(i)
        f = None if ad is None else G.module_factors(ad)
        if ad is not None:
            self.scale_known[i] = bool(getattr(ad, "scale_known", True))
        self._d[i] = f
        if len(self._d) > self.size:
            self._d.popitem(last=False)
        return f


# ------------------------------------------------------------------------------------- dedupe
class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:                      # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return [sorted(g) for g in out.values() if len(g) > 1]


def candidate_pairs(ids: np.ndarray, vectors: np.ndarray, search: Callable, k: int = DEDUPE_K,
                    bound: float = DEDUPE_BOUND) -> set[tuple[int, int]]:
    """Pairs ``(a, b)``, ``a < b``, that are among each other's index neighbours with embedding
    cosine ≥ ``bound``. ``search(vectors, k) -> [[(id, cosine), …], …]``. A row whose k-th
    neighbour is still above the bound is searched again with 2k (a cluster larger than k stays
    connected), so the cost is N·k searches plus the pairs themselves, never N²."""
    pairs: set[tuple[int, int]] = set()
    todo = np.arange(len(ids))
    kk = k + 1                                             # +1: a vector finds itself first
    while len(todo):
        rows = search(vectors[todo], kk)
        again = []
        for pos, hits in zip(todo, rows):
            a = int(ids[pos])
            above = [(int(b), s) for b, s in hits if s >= bound]
            pairs.update((min(a, b), max(a, b)) for b, _s in above if b != a)
            if len(hits) == kk and len(above) == kk:
                again.append(pos)
        if kk >= len(ids):
            break
        todo, kk = np.asarray(again, dtype=np.int64), min(2 * kk, len(ids))
    return pairs


def verify_pairs(pairs: Iterable[tuple[int, int]], norms: dict[int, float | None], shas: dict[int, str],
                 factors: Callable[[int], dict | None], threshold: float = SAME_UPDATE_COSINE,
                 norm_tol: float = SAME_UPDATE_NORM_TOL,
                 scale_known: Callable[[int], bool] | None = None) -> tuple[list[dict], set[int]]:
    """Exactly verified edges ``{a, b, match, cosine, norm_ratio, scale_known}`` and the ids that
    could not be read (file changed or gone since indexing). Pairs are grouped by their first id,
    so each anchor's factors are loaded once and compared with all its partners in one GEMM per
    module. As ``query``: when either file's alpha is unknown (``scale_known(i)`` False) the norms
    are not comparable, so the same direction is enough and the edge says ``scale_known: false``."""
    known = scale_known or (lambda _i: True)
    by_anchor: dict[int, list[int]] = {}
    for a, b in sorted(pairs):
        by_anchor.setdefault(a, []).append(b)
    edges, unreadable = [], set()
    sq: dict[int, float] = {}

    def norm(i: int, f: dict) -> float:
        if norms.get(i) is not None:
            return float(norms[i])
        if i not in sq:
            sq[i] = float(np.sqrt(G.sq_norm(factors=f)))
        return sq[i]

    for a, partners in by_anchor.items():
        same = [b for b in partners if shas.get(a) and shas.get(b) == shas.get(a)]
        edges += [{"a": a, "b": b, "match": "exact", "cosine": 1.0, "norm_ratio": 1.0, "scale_known": True}
                  for b in same]
        rest = [b for b in partners if b not in same]
        if not rest:
            continue
        fa = factors(a)
        if fa is None:
            unreadable.add(a)
            continue
        fbs = [(b, factors(b)) for b in rest]
        unreadable.update(b for b, f in fbs if f is None)
        fbs = [(b, f) for b, f in fbs if f is not None]
        if not fbs:
            continue
        dots = G.cross(None, None, query_factors=fa, other_factors=[f for _b, f in fbs])
        na = norm(a, fa)
        for (b, fb), dot in zip(fbs, dots):
            nb = norm(b, fb)
            cos = float(np.clip(dot / (na * nb), -1, 1)) if na > 0 and nb > 0 else 0.0
            ratio = nb / na if na > 0 else float("inf")
            sized = bool(known(a) and known(b))
            if cos >= threshold and (abs(ratio - 1.0) <= norm_tol or not sized):
                edges.append({"a": a, "b": b, "match": "same-update", "cosine": round(cos, 6),
                              "norm_ratio": round(ratio, 6), "scale_known": sized})
    return edges, unreadable


def _main_dtype(rec: dict) -> str:
    dtypes = ((rec.get("info") or {}).get("dtypes") or {})
    if not dtypes:
        return "?"
    return max(dtypes.items(), key=lambda kv: kv[1])[0] if len(dtypes) == 1 else \
        "+".join(sorted(dtypes, key=lambda d: _PRECISION.get(d, 9)))


def keep_key(rec: dict) -> tuple:
    """The documented rule for the copy to keep (smallest key wins): highest precision of the
    stored factors (F64 > F32 > F16 > BF16 > anything else; a mixed file counts by its lowest
    precision), then a PEFT folder (it carries its config: alpha, targets, base model), then the
    oldest file (smallest mtime), then the lowest index id."""
    dtypes = (rec.get("info") or {}).get("dtypes") or {}
    worst = max((_PRECISION.get(d, 9) for d in dtypes), default=9)
    peft_folder = os.path.isdir(rec["path"]) or (rec.get("format") == "peft" and not rec["path"].endswith(".safetensors"))
    return (worst, 0 if peft_folder else 1, rec.get("mtime_ns") or 0, rec["id"])


def clusters_from_edges(edges: list[dict], records: dict[int, dict]) -> list[dict]:
    """Union-find over verified edges → clusters, each member with its facts and the keeper first."""
    uf = _UnionFind()
    for e in edges:
        uf.union(e["a"], e["b"])
    out = []
    for group in uf.groups():
        recs = sorted((records[i] for i in group), key=keep_key)
        keep = recs[0]["id"]
        members = [{"id": r["id"], "path": r["path"], "format": r.get("format"), "dtype": _main_dtype(r),
                    "size": r.get("size"), "family": r.get("family"), "keep": r["id"] == keep} for r in recs]
        gset = set(group)
        out.append({"keep": keep, "members": members,
                    "pairs": [e for e in edges if e["a"] in gset]})
    out.sort(key=lambda c: (-len(c["members"]), c["keep"]))
    for n, c in enumerate(out, 1):
        c["cluster"] = n
    return out


def dedupe(ls, threshold: float = SAME_UPDATE_COSINE, norm_tol: float = SAME_UPDATE_NORM_TOL,
           k: int = DEDUPE_K, bound: float = DEDUPE_BOUND, family: str | None = None) -> DedupeResult:
    """Clusters of the same adapter across the index (``family`` limits it to one family)."""
    if not (-1.0 <= threshold <= 1.0):
        raise UsageError(f"threshold is a cosine and must be between -1 and 1, not {threshold}")
    if not (-1.0 <= bound <= 1.0):
        raise UsageError(f"bound is a cosine and must be between -1 and 1, not {bound}")
    if k < 1:
        raise UsageError(f"k must be at least 1, not {k}")
    if norm_tol < 0:
        raise UsageError(f"norm tolerance must be 0 or more, not {norm_tol}")
    index = _index_of(ls)
    fams = [family] if family is not None else list(index.families())
    all_edges, unreadable, records, n_pairs = [], set(), {}, 0
    for fam in fams:
        recs = index.records(fam)
        if len(recs) < 2:
            continue
        records.update((r["id"], r) for r in recs)
        ids = np.array([r["id"] for r in recs], dtype=np.int64)
        pairs = candidate_pairs(ids, index.embeddings(ids),
                                lambda v, kk, fam=fam: index.search(v, fam, kk), k=k, bound=bound)
        by_sha: dict[str, list[int]] = {}
        for r in recs:                                     # byte-identical files: no search needed
            by_sha.setdefault(r["sha256"], []).append(r["id"])
        for group in by_sha.values():
            pairs.update((group[0], b) for b in group[1:])
        n_pairs += len(pairs)
        cache = _FactorCache(lambda i: load_indexed(records[i]))

        def known(i: int, cache=cache) -> bool:
            info = records[i].get("info") or {}
            return bool(info.get("scale_known", True)) and cache.scale_known.get(i, True)

        edges, bad = verify_pairs(pairs, {i: records[i].get("delta_norm") for i in ids},
                                  {i: records[i]["sha256"] for i in ids}, cache, threshold, norm_tol, known)
        all_edges += edges
        unreadable |= bad
    clusters = clusters_from_edges(all_edges, records)
    return DedupeResult(
        threshold=threshold, norm_tol=norm_tol, k=k, bound=bound,
        adapters=len(records) if family is not None else index.count(),
        candidate_pairs=n_pairs, clusters=clusters,
        duplicates=sum(len(c["members"]) - 1 for c in clusters),
        unreadable=[{"id": i, "path": records[i]["path"]} for i in sorted(unreadable)])


# ------------------------------------------------------------------------------------ explain
def _embed_query(ls, adapter) -> np.ndarray:
    """The query's embedding as ``query`` makes it (the encoder's ``embed``: the sketch from the factors)."""
    enc = ls.encoder
    if ls.index.encoder_spec() is not None:
        ls.index.check_encoder(enc.spec, enc.version, enc.dim)
    return enc.embed([adapter], device=getattr(ls, "device", "cpu"))[0][0]


def nnls_gram(Gm: np.ndarray, b: np.ndarray, qq: float) -> tuple[np.ndarray, float]:
    """min_{c ≥ 0} ‖q − Σ cᵢ xᵢ‖² given only G = [⟨xᵢ, xⱼ⟩], b = [⟨q, xᵢ⟩], qq = ‖q‖².

    ‖q − Xc‖² = qq − 2bᵀc + cᵀGc; with G = QΛQᵀ that is ‖Λ^½Qᵀc − Λ^-½Qᵀb‖² + const, an ordinary
    NNLS (scipy) on an [m, n] system. Solved on the cosine scale (each xᵢ and q of unit norm) for
    conditioning; near-null directions of G (duplicated candidates) are dropped. Returns
    (c, residual ‖q − Xc‖²)."""
    from scipy.optimize import nnls

    n = len(b)
    if n == 0 or qq <= 0:
        return np.zeros(n), max(qq, 0.0)
    d = np.sqrt(np.clip(np.diag(Gm), 0, None))
    live = d > 0
    c = np.zeros(n)
    if not live.any():
        return c, qq
    Dn = 1.0 / d[live]
    Gs = Gm[np.ix_(live, live)] * Dn[:, None] * Dn[None, :]
    bs = b[live] * Dn / np.sqrt(qq)
    lam, Q = np.linalg.eigh((Gs + Gs.T) / 2)
    keep = lam > max(lam.max(), 0) * 1e-10
    lam, Q = lam[keep], Q[:, keep]
    A = np.sqrt(lam)[:, None] * Q.T
    y = (Q.T @ bs) / np.sqrt(lam)
    cs, _ = nnls(A, y, maxiter=50 * A.shape[1] + 100)
    c[live] = cs * np.sqrt(qq) * Dn
    resid = qq - 2 * float(b @ c) + float(c @ Gm @ c)
    return c, max(resid, 0.0)


def explain_from_gram(Gfull: np.ndarray, names: Sequence[str]) -> dict:
    """NNLS of item 0 on items 1..n of a Gram matrix; the result dict of :func:`explain` (sources,
    explained share, residual, verdict). Exposed for the experiments in ``eval/audit_eval.py``."""
    qq = float(Gfull[0, 0])
    b, Gm = Gfull[0, 1:], Gfull[1:, 1:]
    c, resid = nnls_gram(Gm, b, qq)
    explained = 1.0 - resid / qq if qq > 0 else 0.0
    sources = []
    for i in np.argsort(-c * b):
        if c[i] <= 0:
            continue
        sources.append({"name": names[i], "index": int(i), "coefficient": round(float(c[i]), 6),
                        "share": round(float(c[i] * b[i] / qq), 6) if qq > 0 else 0.0})
    return {"explained": round(float(explained), 6),
            "residual": round(float(np.sqrt(resid / qq)) if qq > 0 else 0.0, 6),
            "sources": sources, "verdict": verdict(sources, explained)}


def verdict(sources: list[dict], explained: float) -> str:
    """One plain-language line: a merge, a partial explanation or 'not a merge'."""
    pct = f"{100 * explained:.1f} % explained"
    named = [s for s in sources if s["share"] >= MIN_SOURCE_SHARE]
    terms = " + ".join(f"{s['coefficient']:.2f} × {Path(s['name']).name}" for s in named)
    if explained >= MERGE_EXPLAINED and len(named) >= 2:
        return f"{terms}, {pct}"
    if explained >= MERGE_EXPLAINED and len(named) == 1:
        return f"a rescaled copy: {terms}, {pct}"
    if explained >= PARTLY_EXPLAINED and named:
        return (f"partly explained by {terms} ({pct}): a lossy merge (e.g. SVD-merged to a lower rank) "
                "or a merge with adapters that are not indexed")
    return f"not a merge of indexed adapters ({pct})"


def explain(ls, path, k: int = EXPLAIN_K) -> ExplainResult:
    """Merge provenance of the adapter at ``path`` over its top-``k`` indexed candidates."""
    if k < 1:
        raise UsageError(f"k must be at least 1, not {k}")
    adapter = load_query(path)
    index = ls.index
    hits = index.search(_embed_query(ls, adapter), adapter.family, k + 10)[0] \
        if index.encoder_spec() else []
    qf = G.module_factors(adapter)
    cands, factors, skipped = [], [], []
    for rid, _s in hits:
        rec = index.get(rid)
        if rec is None:
            continue
        ad = load_indexed(rec)
        if ad is None:
            skipped.append(rec["path"])
            continue
        cands.append(rec)
        factors.append(G.module_factors(ad))
    Gfull = G.gram(None, factors=[qf] + factors)
    qq = Gfull[0, 0]
    norms = np.sqrt(np.clip(np.diag(Gfull), 0, None))
    # copies of the query itself, and copies among the candidates, would make the system singular
    # and the answer trivial or arbitrary: name them, then solve over one representative each
    copies, reps, alternates = [], [], {}
    for j, rec in enumerate(cands, start=1):
        if _same_update(Gfull, 0, j, norms) or rec["sha256"] == adapter.sha256:
            copies.append(rec["path"])
            continue
        dup = next((r for r in reps if _same_update(Gfull, r, j, norms)), None)
        if dup is not None:
            alternates.setdefault(dup, []).append(rec["path"])
        elif len(reps) < k:
            reps.append(j)
    sub = [0] + reps
    res = explain_from_gram(Gfull[np.ix_(sub, sub)], [cands[j - 1]["path"] for j in reps])
    for s in res["sources"]:
        j = reps[s.pop("index")]
        rec = cands[j - 1]
        s["path"] = s.pop("name")
        s.update(id=rec["id"], format=rec.get("format"))
        if alternates.get(j):
            s["same_as"] = alternates[j]
    return ExplainResult(query={"path": str(path), "sha256": adapter.sha256, "format": adapter.format,
                                "family": adapter.family, "delta_norm": round(float(np.sqrt(max(qq, 0))), 6)},
                         k=k, candidates=len(reps), copies_of_query=copies, skipped=skipped, **res)


def _same_update(Gm: np.ndarray, i: int, j: int, norms: np.ndarray) -> bool:
    ni, nj = norms[i], norms[j]
    if ni <= 0 or nj <= 0:
        return False
    return Gm[i, j] / (ni * nj) >= SAME_UPDATE_COSINE and abs(nj / ni - 1) <= SAME_UPDATE_NORM_TOL


# -------------------------------------------------------------------------------------- label
@dataclass
class Vote:
    label: str
    score: float        # weighted vote share, 0..1
    votes: int          # neighbours carrying the label


def knn_vote(sims: np.ndarray, labels: Sequence[Sequence[str]], min_similarity: float = LABEL_MIN_SIMILARITY,
             min_agreement: float = LABEL_MIN_AGREEMENT) -> tuple[list[Vote], str | None]:
    """Similarity-weighted vote of neighbours (``sims`` descending, each with its labels).

    Weight = similarity, neighbours with similarity ≤ 0 do not vote. A label is predicted when its
    weighted share is ≥ ``min_agreement``; abstains (returns the reason) when there is no
    neighbour, the nearest one is less similar than ``min_similarity`` ("far"), or no label
    reaches the agreement ("disagree")."""
    if len(sims) == 0:
        return [], "no labelled adapters of this family"
    w = np.clip(np.asarray(sims, np.float64), 0, None)
    tally: dict[str, list] = {}
    for wi, labs in zip(w, labels):
        for lab in set(labs):
            t = tally.setdefault(lab, [0.0, 0])
            t[0] += wi
            t[1] += 1
    total = float(w.sum())
    votes = sorted((Vote(lab, (s / total) if total > 0 else 0.0, n) for lab, (s, n) in tally.items()),
                   key=lambda v: (-v.score, v.label))
    if float(np.max(sims)) < min_similarity:
        return votes, f"far: the nearest labelled adapter has similarity {float(np.max(sims)):.3f} < {min_similarity}"
    if not votes or votes[0].score < min_agreement:
        best = f"{votes[0].label} {votes[0].score:.2f}" if votes else "none"
        return votes, f"neighbours disagree: best label {best} < {min_agreement}"
    return votes, None


def label(ls, path, k: int = LABEL_K, min_similarity: float = LABEL_MIN_SIMILARITY,
          min_agreement: float = LABEL_MIN_AGREEMENT, rerank: int | None = None) -> LabelResult:
    """Predict labels of the adapter at ``path`` from its ``k`` most similar labelled neighbours.

    Similarity: embedding cosine against every labelled adapter of the family, then the top
    ``rerank`` (default max(5k, 50); 0 = off) re-scored by the exact ΔW cosine, as ``query`` does
    (on the project's collections exact-ΔW kNN is the more accurate: eval/results/audit.md).
    The file itself (same path) is never its own evidence; a labelled copy of it is."""
    from lorasearch.indexer import tags
    from lorasearch.ingest import adapter_root

    if k < 1:
        raise UsageError(f"k must be at least 1, not {k}")
    if rerank is not None and rerank < 0:
        raise UsageError(f"rerank must be 0 or more, not {rerank}")
    adapter = load_query(path)
    index = ls.index
    labelled = tags.labelled(index, family=adapter.family)
    own = os.path.realpath(adapter_root(Path(path)))
    recs = {i: index.get(i) for i in labelled}
    ids = [i for i, r in recs.items() if r is not None and r["path"] != own]
    evidence, sims = [], np.zeros(0)
    if ids and index.encoder_spec():
        q = _embed_query(ls, adapter).astype(np.float64)
        q /= np.linalg.norm(q) or 1.0
        V = index.embeddings(ids).astype(np.float64)
        V /= np.clip(np.linalg.norm(V, axis=1, keepdims=True), 1e-30, None)
        emb = V @ q
        depth = max(5 * k, 50) if rerank is None else rerank
        top = np.argsort(-emb, kind="stable")[:max(k, depth)]
        scored = {}                                        # position in ids -> exact ΔW cosine
        if depth:
            loaded = [(o, load_indexed(recs[ids[o]])) for o in top[:depth]]
            loaded = [(o, ad) for o, ad in loaded if ad is not None]
            if loaded:
                qf = G.module_factors(adapter)
                ofs = [G.module_factors(ad) for _o, ad in loaded]
                dots = G.cross(None, None, query_factors=qf, other_factors=ofs)
                qn = np.sqrt(G.sq_norm(factors=qf))
                for (o, _ad), f, dot in zip(loaded, ofs, dots):
                    on = recs[ids[o]].get("delta_norm") or np.sqrt(G.sq_norm(factors=f))
                    scored[int(o)] = float(dot / (qn * on)) if qn > 0 and on > 0 else 0.0
        # exactly re-scored neighbours first (as query ranks them), then the rest by embedding
        order = sorted((int(o) for o in top), key=lambda o: (o not in scored, -scored.get(o, emb[o])))[:k]
        sims = np.array([scored.get(o, emb[o]) for o in order])
        evidence = [{"id": ids[o], "path": recs[ids[o]]["path"], "similarity": round(float(scored.get(o, emb[o])), 6),
                     "exact": o in scored, "labels": labelled[ids[o]]} for o in order]
    votes, reason = knn_vote(sims, [e["labels"] for e in evidence], min_similarity, min_agreement)
    predicted = [] if reason else [v.label for v in votes if v.score >= min_agreement]
    return LabelResult(query={"path": str(path), "sha256": adapter.sha256, "family": adapter.family},
                       k=k, labels=predicted, abstained=reason is not None, reason=reason,
                       scores=[{"label": v.label, "score": round(v.score, 6), "votes": v.votes} for v in votes],
                       evidence=evidence, labelled_in_family=len(ids))


# ------------------------------------------------------------------------------- tag / untag
def resolve(ls, item) -> dict | None:
    """An indexed adapter by id or by path (as ``remove`` resolves them)."""
    from lorasearch.ingest import adapter_root

    index = _index_of(ls)
    if str(item).isdigit():
        rec = index.get(int(item))
        if rec is not None:
            return rec
    return index.by_path(os.path.realpath(adapter_root(Path(str(item)))))


def _read_labels(path):
    """The project's one labels-CSV reader (header ``name,label``)."""
    from lorasearch.data.loaders import read_labels

    return read_labels(path)


def tag(ls, item=None, labels: Sequence[str] = (), labels_file=None) -> TagResult:
    """Attach ``labels`` to the indexed adapter ``item`` (id or path), or every row of the CSV
    ``labels_file`` (header ``name,label``; name = file or folder name, several labels in a cell
    separated by ``;``). Adapters not in the index are listed in ``not_found``; the others are
    still tagged. A CSV name matching two indexed adapters is refused (tag those by id or path)."""
    from lorasearch.indexer import tags

    if bool(labels_file) == bool(item is not None and str(item) != ""):
        raise UsageError("give either ITEM LABEL... or --labels CSV")
    if item is not None and not labels:
        raise UsageError(f"no label given for {item}")
    index = _index_of(ls)
    pairs, not_found = [], []
    if labels_file:
        table = _read_labels(labels_file)
        by_name: dict[str, list[dict]] = {}
        for rec in index.records():
            by_name.setdefault(Path(rec["path"]).name, []).append(rec)
        for name, cell in table.items():
            recs = by_name.get(Path(name).name, [])
            if len(recs) > 1:
                raise BadAdapterError(labels_file, f"name {name!r} matches {len(recs)} indexed adapters "
                                      f"({recs[0]['path']}, {recs[1]['path']} …); tag them by id or path")
            if not recs:
                not_found.append(name)
                continue
            pairs += [(recs[0]["id"], lab) for lab in cell.split(";") if lab.strip()]
    else:
        rec = resolve(index, item)
        if rec is None:
            not_found.append(str(item))
        else:
            pairs += [(rec["id"], lab) for lab in labels]
    added = tags.add(index, pairs) if pairs else 0
    return TagResult(tagged=len(pairs), new=added, not_found=not_found)


def untag(ls, item, labels: Sequence[str] | None = None) -> UntagResult:
    """Detach ``labels`` (all of them when empty or None) from the indexed adapter ``item``."""
    from lorasearch.indexer import tags

    rec = resolve(ls, item)
    if rec is None:
        raise MissingError(f"not in index: {item}")
    n = tags.remove(_index_of(ls), rec["id"], list(labels) if labels else None)
    return UntagResult(id=rec["id"], path=rec["path"], removed=n)


def label_counts(ls) -> LabelsResult:
    """Every label and how many adapters carry it (``tag --list``)."""
    from lorasearch.indexer import tags

    return LabelsResult(tags.counts(_index_of(ls)))
