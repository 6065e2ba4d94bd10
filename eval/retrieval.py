"""The query/gallery retrieval protocol (W2T §retrieval), for several methods in one run.

Relevance is binary: a gallery adapter is relevant to a query when they share a label.
Only adapters of the same base-model family are comparable; a cross-family pair is not
ranked at all. Every adapter is read and canonicalized once, then each method scores the
same canonical forms:

* an encoder spec (``sketch``, ``w2t:PATH`` …): cosine of the encoder's embeddings;
* ``dense``: the exact Frobenius cosine of the ΔWs (the upper reference);
* ``rawcos``: cosine of the flattened raw factors (W2T's non-invariant baseline).

Inputs are either a gallery folder + queries folder + a ``name,label[,shots]`` CSV, or a
collection folder with ``manifest.parquet`` (``path``, ``role`` gallery/query, a label
column, optional ``shots``).
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lorasearch.data.loaders import BadLabelsError, check_labels, list_adapter_entries, read_label_table
from lorasearch.errors import MissingError, UsageError
from lorasearch.results import JSON_VERSION
from lorasearch.eval.metrics import aggregate, aggregate_by, chance_metrics, evaluate_scores

REFERENCE_METHODS = ("dense", "rawcos")
LABEL_COLUMNS = ("label", "task", "superclass", "category_label")
HEADLINE = ("ndcg@10", "hit@1", "map@10", "recall@10")


@dataclass
class EvalItem:
    name: str
    path: Path
    role: str                     # "gallery" | "query"
    label: str
    shots: str | None = None
    canonical: object | None = None   # CanonicalAdapter once loaded (its .raw is the LoraAdapter)

    @property
    def family(self) -> str:
        return self.canonical.family if self.canonical is not None else "?"


@dataclass
class EvalSet:
    gallery: list[EvalItem]
    queries: list[EvalItem]
    source: dict = field(default_factory=dict)

    @property
    def items(self) -> list[EvalItem]:
        return self.gallery + self.queries


# ----------------------------------------------------------------------------- inputs

def read_labels_csv(path: str | Path) -> dict[str, tuple[str, str | None]]:
    """``name -> (label, shots)``: the one labels reader, ``data.loaders.read_label_table``."""
    return read_label_table(path)


def list_adapters(folder: Path) -> list[Path]:
    """Direct children that are adapters (``data.loaders.list_adapter_entries``), sorted."""
    return list(list_adapter_entries(folder).values())


def from_folders(gallery: str | Path, queries: str | Path, labels: str | Path) -> EvalSet:
    """Pair every adapter in the two folders with its label; refuse any mismatch."""
    gallery, queries, labels = Path(gallery), Path(queries), Path(labels)
    table = read_label_table(labels)
    found: dict[str, list[EvalItem]] = {"gallery": [], "query": []}
    for role, folder in (("gallery", gallery), ("query", queries)):
        for name, p in list_adapter_entries(folder).items():
            label, shots = table.get(name, ("", None))
            found[role].append(EvalItem(name, p, role, label, shots))
    check_labels([it.name for it in found["gallery"] + found["query"]], table, labels, f"{gallery} or {queries}")
    for role, folder in (("gallery", gallery), ("query", queries)):
        if not found[role]:
            raise MissingError(f"{folder}: no adapters in the {role} folder")
    return EvalSet(found["gallery"], found["query"],
                   {"gallery": str(gallery), "queries": str(queries), "labels": str(labels)})


def from_collection(folder: str | Path, label_column: str | None = None) -> EvalSet:
    """A collection written by ``lorasearch data make``: ``manifest.parquet`` next to the adapters."""
    from lorasearch.data.manifest import read_manifest

    folder = Path(folder)
    manifest = folder / "manifest.parquet"
    table = read_manifest(folder, require=("path", "role"))
    cols = set(table[0]) if table else set()
    col = label_column or next((c for c in LABEL_COLUMNS if c in cols), None)
    if col is None or col not in cols:
        raise BadLabelsError(manifest, f"needs a label column ({label_column or '/'.join(LABEL_COLUMNS)}); "
                                       f"has {sorted(cols)}")
    found: dict[str, list[EvalItem]] = {"gallery": [], "query": []}
    for i, row in enumerate(table):
        role = str(row["role"] or "").lower()
        role = {"queries": "query", "test": "query", "train": "gallery"}.get(role, role)
        if role not in found:
            continue
        if not row["path"] or row[col] is None:
            raise BadLabelsError(manifest, f"row {i}: empty path or {col}")
        p = Path(row["path"])
        p = p if p.is_absolute() else folder / p
        if not p.exists():
            raise MissingError(f"{manifest}: row {i}: {p} not found")
        shots = row.get("shots")
        shots = None if shots is None or (isinstance(shots, float) and np.isnan(shots)) else str(shots)
        found[role].append(EvalItem(str(row["path"]), p, role, str(row[col]), shots))
    for role in found:
        if not found[role]:
            raise BadLabelsError(manifest, f"no rows with role {role!r}")
    return EvalSet(found["gallery"], found["query"], {"collection": str(folder), "label_column": col})


def select_labels(es: EvalSet, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                  filter_gallery: bool = True) -> EvalSet:
    """Held-out evaluation: keep queries (and, by default, gallery items) with these labels only."""
    include = set(include) if include else None
    exclude = set(exclude or ())
    known = {it.label for it in es.items}
    unknown = ((include or set()) | exclude) - known
    if unknown:
        raise UsageError(f"unknown label(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")

    def keep(it):
        return (include is None or it.label in include) and it.label not in exclude

    queries = [it for it in es.queries if keep(it)]
    gallery = [it for it in es.gallery if keep(it)] if filter_gallery else list(es.gallery)
    if not queries or not gallery:
        raise UsageError("the label selection leaves no queries or no gallery adapters")
    src = dict(es.source, include=sorted(include) if include else None, exclude=sorted(exclude) or None,
               filter_gallery=filter_gallery)
    return EvalSet(gallery, queries, src)


def load(es: EvalSet, device: str = "auto") -> EvalSet:
    """Read and canonicalize every adapter once (errors name the file); returns a loaded copy."""
    from lorasearch.adapters import load_adapter
    from lorasearch.canonical import canonicalize_many

    from tqdm import tqdm

    items = es.items
    bar = tqdm(items, desc="reading adapters", unit="adapter", disable=not sys.stderr.isatty(), leave=False)
    raws = [load_adapter(it.path) for it in bar]
    canon = canonicalize_many(raws, device=device)        # each keeps .raw = its LoraAdapter
    loaded = [replace(it, canonical=c) for it, c in zip(items, canon)]
    n = len(es.gallery)
    return EvalSet(loaded[:n], loaded[n:], es.source)


# ----------------------------------------------------------------------------- scoring

def _reference_scores(method: str, q: list, g: list) -> np.ndarray:
    from lorasearch import similarity

    fn = {"dense": similarity.pairwise_dense_cosine, "rawcos": similarity.pairwise_rawcos}[method]
    return np.asarray(fn(q, g), dtype=np.float64)


def encoder_for(spec: str, fit_on: list):
    """``get_encoder(spec)``; an encoder that must first be fitted to a layout (FlatVec and the
    other LoRA-WS baselines, when no checkpoint is named) is fitted on ``fit_on`` (label-free)."""
    from lorasearch.encoders import get_encoder

    enc = get_encoder(spec)
    if callable(getattr(enc, "fit", None)) and not getattr(enc, "dim", 0):
        enc.fit(fit_on)
    return enc


@dataclass
class MethodScores:
    name: str
    kind: str                      # "encoder" | "reference"
    spec: str
    scores: np.ndarray             # [n_query, n_gallery]; NaN where the pair is not comparable
    seconds: float
    embeddings: dict = field(default_factory=dict)   # family -> (names, labels, roles, [n, dim]) for encoders


def score_methods(es: EvalSet, methods: Sequence[str]) -> list[MethodScores]:
    """Score every query against every same-family gallery adapter with each method."""
    families = sorted({it.family for it in es.items})
    out = []
    # re-ranked methods last, so they reuse the bare encoder's and dense's scores; reported in order asked
    for method in sorted(methods, key=lambda m: "+rerank@" in m):
        if "+rerank@" in method:   # what `lorasearch query` returns: encoder top-N re-scored exactly
            out.append(_reranked(es, method, out))
            continue
        t0 = time.perf_counter()
        S = np.full((len(es.queries), len(es.gallery)), np.nan)
        embeddings = {}
        ref = method in REFERENCE_METHODS
        enc = None
        for fam in families:
            qi = [i for i, it in enumerate(es.queries) if it.family == fam]
            gi = [i for i, it in enumerate(es.gallery) if it.family == fam]
            if not qi or not gi:
                continue
            qc = [es.queries[i].canonical for i in qi]
            gc = [es.gallery[i].canonical for i in gi]
            if ref:
                block = _reference_scores(method, qc, gc)
            else:
                enc = encoder_for(method, gc)   # per family: fitted layouts are per family
                X = np.asarray(enc.encode(gc + qc), dtype=np.float32)
                G, Q = X[:len(gc)], X[len(gc):]
                block = Q.astype(np.float64) @ G.astype(np.float64).T
                its = [es.gallery[i] for i in gi] + [es.queries[i] for i in qi]
                embeddings[fam] = ([it.name for it in its], [it.label for it in its],
                                   [it.role for it in its], X)
            S[np.ix_(qi, gi)] = block
        out.append(MethodScores(method, "reference" if ref else "encoder",
                                enc.spec if enc is not None else method, S,
                                time.perf_counter() - t0, embeddings))
    return sorted(out, key=lambda ms: list(methods).index(ms.name))


def _reranked(es: EvalSet, method: str, done: list[MethodScores]) -> MethodScores:
    """``SPEC+rerank@N``: rank by the encoder, then re-score its top N by the exact dense cosine
    (the query path of the index); the rest keep their encoder order below them."""
    base_spec, _, n = method.partition("+rerank@")
    try:
        n_top = int(n)
    except ValueError:
        raise UsageError(f"bad method {method!r}: expected SPEC+rerank@N with N an integer") from None
    t0 = time.perf_counter()
    have = {m.name: m for m in done}
    base = have.get(base_spec) or score_methods(es, [base_spec])[0]
    dense = have.get("dense") or score_methods(es, ["dense"])[0]
    from lorasearch.query import fused_score, ranking_weight
    # as `query`: a learned encoder's order is kept (fusion weight from its checkpoint), sketch re-ranks exactly
    # (per query: `auto` keeps a learned order only for the families it routes to a learned encoder)
    enc = encoder_for(base_spec, []) if (":" in base_spec or base_spec == "auto") else None
    ws = [ranking_weight(enc, it.family) if enc is not None else 0.0 for it in es.queries]
    S = np.full_like(base.scores, np.nan)
    for qi in range(S.shape[0]):
        row = base.scores[qi]
        ok = np.flatnonzero(~np.isnan(row))
        top = ok[np.argsort(-row[ok], kind="stable")[:n_top]]
        S[qi, ok] = row[ok] - 10.0          # below every re-scored candidate (cosines are ≥ -1)
        S[qi, top] = fused_score(row[top], dense.scores[qi, top], ws[qi])
    seconds = base.seconds + (time.perf_counter() - t0) + dense.seconds * min(1.0, n_top / max(1, S.shape[1]))
    return MethodScores(method, "encoder", f"{base.spec}+rerank@{n_top}", S, seconds, base.embeddings)


# ----------------------------------------------------------------------------- the protocol

def evaluate(es: EvalSet, methods: Sequence[str] = ("sketch", "rawcos", "dense"), k: int = 10,
             scored: list[MethodScores] | None = None) -> dict:
    """Run the protocol on a loaded set; returns the versioned result object (``kind: retrieval``)."""
    t0 = time.perf_counter()
    if any(it.canonical is None for it in es.items):
        es = load(es)
    t_load = time.perf_counter() - t0
    methods = list(dict.fromkeys(methods))
    scored = scored if scored is not None else score_methods(es, methods)
    qlab = np.array([it.label for it in es.queries])
    glab = np.array([it.label for it in es.gallery])
    qfam = np.array([it.family for it in es.queries])
    gfam = np.array([it.family for it in es.gallery])
    relevant = qlab[:, None] == glab[None, :]
    valid = qfam[:, None] == gfam[None, :]
    shots = [it.shots if it.shots is not None else "-" for it in es.queries]
    result = {
        "version": JSON_VERSION, "kind": "retrieval", "k": k,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "source": es.source,
        "n_gallery": len(es.gallery), "n_queries": len(es.queries),
        "labels": sorted(set(glab) | set(qlab)),
        "families": {f: {"gallery": int((gfam == f).sum()), "queries": int((qfam == f).sum())}
                     for f in sorted(set(gfam) | set(qfam))},
        "excluded_cross_family_pairs": int((~valid).sum()),
        "load_seconds": round(t_load, 3),
        "methods": {},
    }
    chance = [chance_metrics(int((relevant[q] & valid[q]).sum()), int(valid[q].sum()), k)
              if (relevant[q] & valid[q]).any() else None for q in range(len(es.queries))]
    result["chance"] = {"overall": aggregate(chance), "per_label": aggregate_by(chance, qlab)}
    for ms in scored:
        per_q = evaluate_scores(np.nan_to_num(ms.scores, nan=-np.inf), relevant, valid, k)
        entry = {"kind": ms.kind, "spec": ms.spec, "seconds": round(ms.seconds, 3),
                 "overall": aggregate(per_q), "per_label": aggregate_by(per_q, qlab)}
        if any(s != "-" for s in shots):
            entry["per_shots"] = aggregate_by(per_q, shots)
        result["methods"][ms.name] = entry
    result["_scored"] = scored  # not JSON: embeddings for the report; dropped by `public()`
    return result


def default_methods(encoders: Sequence[str], k: int = 10, rerank: int | None = None,
                    references: bool = True) -> list[str]:
    """What `lorasearch eval retrieval` measures by default: each encoder as `lorasearch query` uses
    it (``SPEC+rerank@N``, N = query's default depth for this k unless given; 0 = none), the bare
    encoder beside it, then the references."""
    from lorasearch.query import default_rerank_depth

    depth = default_rerank_depth(k) if rerank is None else rerank
    methods = []
    for spec in encoders:
        if depth > 0 and "+rerank@" not in spec:
            methods.append(f"{spec}+rerank@{depth}")
        methods.append(spec)
    return methods + (list(REFERENCE_METHODS) if references else [])


def training_evaluator(k: int = 10):
    """The evaluator ``encoders.train`` calls each epoch: NDCG@k and Hit@1 of held-out queries
    against the training gallery by embedding cosine (this module's metric definitions)."""
    def evaluate_embeddings(q: np.ndarray, g: np.ndarray, q_lab: np.ndarray, g_lab: np.ndarray) -> dict:
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        agg = aggregate(evaluate_scores(qn.astype(np.float64) @ gn.astype(np.float64).T,
                                        np.asarray(q_lab)[:, None] == np.asarray(g_lab)[None, :], k=k))
        return {f"ndcg@{k}": agg.get(f"ndcg@{k}", float("nan")), "hit@1": agg.get("hit@1", float("nan"))}

    return evaluate_embeddings


def machine() -> str:
    """CPU model, core count, OS, and the GPU when torch sees one: what a reported number ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = f"{cpu}, {os.cpu_count()} cores, {platform.system()}"
    try:
        import torch

        if torch.cuda.is_available():
            out += f", {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - the description is best-effort
        pass
    return out


def public(result: dict) -> dict:
    """The JSON-safe part of a result."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def run(gallery=None, queries=None, labels=None, collection=None, methods=("sketch", "rawcos", "dense"),
        include=None, exclude=None, filter_gallery=True, label_column=None, k: int = 10) -> dict:
    """Everything `lorasearch eval retrieval` does, as one call."""
    if collection is not None:
        es = from_collection(collection, label_column)
    elif gallery is not None and queries is not None and labels is not None:
        es = from_folders(gallery, queries, labels)
    else:
        raise UsageError("give --collection DIR, or all of --gallery DIR --queries DIR --labels CSV")
    if include or exclude:
        es = select_labels(es, include, exclude, filter_gallery)
    return evaluate(es, methods, k)


# ----------------------------------------------------------------------------- text

def _fmt(x) -> str:
    return f"{100 * x:.2f}" if isinstance(x, float) else str(x)


def format_table(result: dict, markdown: bool = False) -> str:
    """The overall table, then NDCG@k by shots and by label, one column per method."""
    k = result["k"]
    cols = [c.replace("10", str(k)) for c in HEADLINE]
    names = list(result["methods"])
    lines = []

    def table(header, rows):
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines.extend("| " + " | ".join(r) + " |" for r in rows)
        else:
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
            lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
        lines.append("")

    lines.append(f"retrieval: {result['n_queries']} queries x {result['n_gallery']} gallery, "
                 f"{len(result['labels'])} labels, metrics x100")
    lines.append("")
    rows = [[m] + [_fmt(result["methods"][m]["overall"].get(c, float("nan"))) for c in cols]
            + [str(result["methods"][m]["overall"]["n"]), f"{result['methods'][m]['seconds']:.2f}"]
            for m in names]
    if "chance" in result:
        ch = result["chance"]["overall"]
        rows.append(["(random ranking)"] + [_fmt(ch.get(c, float("nan"))) for c in cols] + [str(ch["n"]), "-"])
    table(["method"] + cols + ["queries", "seconds"], rows)
    for group, title in (("per_shots", "shots"), ("per_label", "label")):
        keys = []
        for m in names:
            for key in result["methods"][m].get(group, {}):
                if key not in keys:
                    keys.append(key)
        if not keys:
            continue
        table([title] + [f"{m} NDCG@{k}" for m in names] + ["queries"],
              [[key] + [_fmt(result["methods"][m][group].get(key, {}).get(f"ndcg@{k}", "-")) for m in names]
               + [str(result["methods"][names[0]][group].get(key, {}).get("n", 0))] for key in keys])
    return "\n".join(lines).rstrip() + "\n"
