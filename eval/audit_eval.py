"""Experiments for issue 12 (`explain` and `label`), on the project's real collections.

1. explain vs SVD-merge rank truncation: linear merges of 2–3 real demo adapters (random
   non-negative weights) re-factorized to rank r by SVD (as SVD-merge scripts do); each merged file
   is explained by ``audit.explain`` against an index of the demo gallery. Reported per r: mean
   explained share, worst coefficient error, and how often each verdict was given.
2. kNN labels vs the LoRA-WS probe: on ``data/collections/language-cpu`` (tasks) and
   ``data/collections/diffusion-cpu`` (superclasses), the probe's 70/10/20 split per seed; kNN
   (``audit.knn_vote``, k=10, similarity-weighted) with the train+val adapters as the labelled set,
   by number of labelled adapters (subsampled), scored on the probe's test split. Similarities: the
   index's sketch embedding cosine, and the exact ΔW cosine (``lorasearch.gram``).
3. moderation: each diffusion superclass in turn is "flagged"; the flagged vote share is the
   score (AUROC) and the label rule's decision gives precision / recall.

    nice python -m lorasearch.eval.audit_eval --out eval/results/audit/audit_eval.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lorasearch import audit
from lorasearch import gram as G
from lorasearch.types import LoraAdapter, LoraModule

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
LANG = ROOT / "data" / "collections" / "language-cpu"
DIFF = ROOT / "data" / "collections" / "diffusion-cpu"


# ------------------------------------------------------------------------ 1. SVD truncation
def svd_merge(parts: list[tuple[float, LoraAdapter]], rank: int | None) -> LoraAdapter:
    """Σ cᵢ ΔWᵢ per module, re-factorized to ``rank`` by a truncated SVD from the stacked factors
    (QR of each side, SVD of the small core): what SVD-merge scripts write."""
    names = sorted({m.name for _c, a in parts for m in a.modules})
    mods = []
    for name in names:
        got = [(c, a.module(name)) for c, a in parts if a.module(name) is not None]
        L = np.concatenate([c * m.scale * m.B.astype(np.float64) for c, m in got], axis=1)
        R = np.concatenate([m.A.astype(np.float64) for _c, m in got], axis=0).T
        Ql, Rl = np.linalg.qr(L)
        Qr, Rr = np.linalg.qr(R)
        U, s, Vt = np.linalg.svd(Rl @ Rr.T)
        r = len(s) if rank is None else min(rank, len(s))
        B = (Ql @ U[:, :r]) * s[:r]
        A = (Qr @ Vt[:r].T).T
        mods.append(LoraModule(name, A.astype(np.float32), B.astype(np.float32), 1.0, "F32", got[0][1].shape, float(r)))
    return LoraAdapter("", "memory", "", parts[0][1].family, mods)


def explain_truncation(trials: int = 12, ranks=(1, 2, 4, 8, 16, None), seed: int = 0) -> list[dict]:
    from lorasearch.adapters import find_adapters, load_adapter
    from lorasearch.adapters.writers import write_adapter
    from lorasearch.api import Lorasearch

    rng = np.random.default_rng(seed)
    # one copy per update: the demo's re-encodings (copy, bf16, rescaled, reparam) are left out as sources
    sources = [p for p in find_adapters(DEMO / "gallery")
               if not any(t in p.name for t in ("-copy", "-bf16", "-rescaled", "-reparam"))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Lorasearch(Path(tmp) / "idx", create=True, device="cpu") as ls:
        ls.index_dir(DEMO / "gallery", progress=False)
        for t in range(trials):
            n_src = 2 + t % 2
            pick = rng.choice(len(sources), n_src, replace=False)
            w = rng.uniform(0.2, 1.0, n_src)
            parts = [(float(c), load_adapter(sources[i])) for c, i in zip(w, pick)]
            truth = {str(Path(sources[i]).resolve()): float(c) for c, i in zip(w, pick)}
            for r in ranks:
                path = Path(tmp) / f"m{t}-r{r}.safetensors"
                write_adapter(svd_merge(parts, r), path, "peft-file", dtype="F32")
                res = audit.explain(ls, path, k=20)
                got = {}
                for s in res["sources"]:          # a source may be found as one of its indexed copies
                    for p in [s["path"]] + s.get("same_as", []):
                        got[p] = s["coefficient"]
                err = max(abs(got.get(p, 0.0) - c) for p, c in truth.items())
                kind = ("merge" if not res["verdict"].startswith(("partly", "not", "a rescaled")) else
                        res["verdict"].split()[0])
                rows.append({"trial": t, "sources": n_src, "rank": "full" if r is None else r,
                             "explained": res["explained"], "max_coef_error": err, "verdict": kind})
    return rows


# ------------------------------------------------------------------------ 2./3. labels
def load_collection(name: str) -> tuple[list[LoraAdapter], list[str]]:
    from lorasearch.adapters import load_adapter

    if name == "language":
        from lorasearch.data.loaders import read_labels

        table = read_labels(LANG / "labels.csv")
        paths = [(LANG / d / n) for n in table for d in ("gallery", "queries") if (LANG / d / n).exists()]
        return [load_adapter(p) for p in paths], [table[p.name] for p in paths]
    import pyarrow.parquet as pq

    t = pq.read_table(DIFF / "manifest.parquet", columns=["path", "label"]).to_pydict()
    return [load_adapter(DIFF / p) for p in t["path"]], list(t["label"])


def similarities(adapters: list[LoraAdapter]) -> dict[str, np.ndarray]:
    from lorasearch.canonical import canonicalize_many
    from lorasearch.encoders import get_encoder

    canon = canonicalize_many(adapters, device="cpu")
    E = get_encoder("sketch").encode(canon)
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    A = get_encoder("auto").encode(canon)          # the default since issue 11 (MiniLM: subspace:minilm-x)
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    Gm = G.gram(adapters)
    d = np.sqrt(np.diag(Gm))
    return {"sketch": E @ E.T, "auto": A @ A.T, "exact": Gm / np.outer(d, d), "_features": E}


def knn_predict(S: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = audit.LABEL_K,
                **rule) -> tuple[list, list, list]:
    """(predicted label or None, abstain reason, vote shares dict) per test adapter."""
    preds, reasons, shares = [], [], []
    for i in test:
        sims = S[i, train]
        order = np.argsort(-sims, kind="stable")[:k]
        votes, reason = audit.knn_vote(sims[order], [[labels[train[o]]] for o in order], **rule)
        preds.append(None if reason else votes[0].label)
        reasons.append(reason)
        shares.append({v.label: v.score for v in votes})
    return preds, reasons, shares


def label_curves(name: str, seeds: int = 5, sizes=(8, 16, 32, 64), probe_epochs: int = 100) -> dict:
    from lorasearch.eval.probe import probe, split_70_10_20

    t0 = time.perf_counter()
    adapters, labels = load_collection(name)
    labels = np.asarray(labels)
    S = similarities(adapters)
    classes, y = np.unique(labels, return_inverse=True)
    out = {"collection": name, "n": len(labels), "classes": len(classes), "rows": []}
    for sim in ("sketch", "auto", "exact"):
        for size in list(sizes) + ["all"]:
            acc, acc_ans, ans, acc_noabst = [], [], [], []
            for seed in range(seeds):
                tr, va, te = split_70_10_20(y, seed)
                pool = np.concatenate([tr, va])
                rng = np.random.default_rng(seed)
                lab = pool if size == "all" or size >= len(pool) else rng.choice(pool, size, replace=False)
                preds, _r, shares = knn_predict(S[sim], labels, lab, te)
                truth = labels[te]
                ok = np.array([p == t for p, t in zip(preds, truth)])
                answered = np.array([p is not None for p in preds])
                acc.append(ok.mean())
                ans.append(answered.mean())
                acc_ans.append(ok[answered].mean() if answered.any() else np.nan)
                top = [max(s, key=s.get) if s else None for s in shares]   # forced choice, no abstention
                acc_noabst.append(np.mean([p == t for p, t in zip(top, truth)]))
            out["rows"].append({"similarity": sim, "labelled": size if size == "all" else int(size),
                                "accuracy_forced": float(np.mean(acc_noabst)), "accuracy_forced_std": float(np.std(acc_noabst)),
                                "answered": float(np.mean(ans)), "accuracy_answered": _nanmean(acc_ans),
                                "accuracy_abstain_as_wrong": float(np.mean(acc))})
    p = probe(S["_features"], labels, seeds=seeds, max_epochs=probe_epochs)
    out["probe_sketch"] = {"accuracy": p["accuracy"], "auroc": p["auroc"], "n_train": p["runs"][0]["n_train"]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _nanmean(xs) -> float | None:
    xs = [x for x in xs if not np.isnan(x)]
    return float(np.mean(xs)) if xs else None            # None: the rule never flagged anything


def moderation(seeds: int = 5) -> dict:
    from sklearn.metrics import roc_auc_score

    from lorasearch.eval.probe import split_70_10_20

    adapters, labels = load_collection("diffusion")
    labels = np.asarray(labels)
    S = similarities(adapters)
    _c, y = np.unique(labels, return_inverse=True)
    rows = []
    for flagged in sorted(set(labels)):
        binary = np.where(labels == flagged, "flagged", "ok")
        for sim in ("sketch", "exact"):
            aucs, precs, recs, p30, r30 = [], [], [], [], []
            for seed in range(seeds):
                tr, va, te = split_70_10_20(y, seed)
                preds, _r, shares = knn_predict(S[sim], binary, np.concatenate([tr, va]), te)
                score = np.array([s.get("flagged", 0.0) for s in shares])
                truth = binary[te] == "flagged"
                aucs.append(roc_auc_score(truth, score))
                flag = np.array([p == "flagged" for p in preds])
                tp = int((flag & truth).sum())
                precs.append(tp / flag.sum() if flag.sum() else np.nan)
                recs.append(tp / truth.sum())
                flag = score >= 0.3                        # a moderation operating point: 30 % of the vote
                tp = int((flag & truth).sum())
                p30.append(tp / flag.sum() if flag.sum() else np.nan)
                r30.append(tp / truth.sum())
            rows.append({"flagged": flagged, "similarity": sim, "auroc": float(np.mean(aucs)),
                         "precision": _nanmean(precs), "recall": float(np.mean(recs)),
                         "precision_at_0.3": _nanmean(p30), "recall_at_0.3": float(np.mean(r30))})
    return {"collection": "diffusion", "rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval/results/audit/audit_eval.json")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--only", default="explain,labels,moderation")
    args = ap.parse_args(argv)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": "2-core shared x86_64, no GPU"}
    only = set(args.only.split(","))
    if "explain" in only:
        result["explain_truncation"] = explain_truncation(args.trials)
        print("explain done", flush=True)
    if "labels" in only:
        result["labels"] = [label_curves("language", args.seeds), label_curves("diffusion", args.seeds)]
        print("labels done", flush=True)
    if "moderation" in only:
        result["moderation"] = moderation(args.seeds)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
