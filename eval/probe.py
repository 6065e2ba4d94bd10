"""Classification probe, the LoRA-WS Table 1 protocol, for any representation of adapters.

Per seed: split 70/10/20 (train / validation / test, stratified when every class has enough
members), z-score features with training statistics, train an MLP [in → 512 → 512 → 512 → C]
with ReLU (Adam 1e-3, batch 32, ReduceLROnPlateau factor 0.5 patience 5, cross-entropy),
stop when the validation loss has not improved for ``patience`` epochs and restore the best
weights, then score the test split: accuracy, macro one-vs-rest AUROC, macro F1. Reported as
mean ± std over seeds. LoRA-WS kept one split (seed 42) and varied only the initialization;
here each seed draws its own split too, so the spread includes split variance.

Runs on CPU with torch; small and deterministic for a given seed.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import train_test_split

from lorasearch.errors import UsageError
from lorasearch.results import JSON_VERSION


def _stratify(y: np.ndarray, test_fraction: float) -> np.ndarray | None:
    """``y`` when a stratified split is possible (each side can hold every class), else None."""
    n, present = len(y), np.bincount(y)
    present = present[present > 0]
    n_test = int(np.ceil(test_fraction * n))
    ok = present.min() >= 2 and min(n_test, n - n_test) >= len(present)
    return y if ok else None


def split_70_10_20(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays (train, val, test) ≈ 70/10/20, LoRA-WS's two-step split (0.3, then 0.67 of it)."""
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.3, random_state=seed, stratify=_stratify(y, 0.3))
    va, te = train_test_split(rest, test_size=0.67, random_state=seed, stratify=_stratify(y[rest], 0.67))
    return tr, va, te


def make_mlp(d_in: int, n_classes: int, hidden: int = 512, depth: int = 3) -> torch.nn.Module:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [torch.nn.Linear(d, hidden), torch.nn.ReLU()]
        d = hidden
    layers.append(torch.nn.Linear(d, n_classes))
    return torch.nn.Sequential(*layers)


def macro_auroc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    """Macro one-vs-rest AUROC over the classes that have positives and negatives in ``y``."""
    if n_classes == 2:
        return float(roc_auc_score(y, proba[:, 1])) if len(set(y)) == 2 else float("nan")
    scores = [roc_auc_score(y == c, proba[:, c]) for c in range(n_classes) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(scores)) if scores else float("nan")


def train_one(X: np.ndarray, y: np.ndarray, n_classes: int, seed: int, hidden: int = 512, depth: int = 3,
              lr: float = 1e-3, batch: int = 32, max_epochs: int = 300, patience: int = 20) -> dict:
    """One seed of the protocol; returns the test metrics and the epochs run."""
    tr, va, te = split_70_10_20(y, seed)
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0
    Z = torch.from_numpy(((X - mu) / sd).astype(np.float32))
    Y = torch.from_numpy(y.astype(np.int64))
    torch.manual_seed(seed)
    model = make_mlp(X.shape[1], n_classes, hidden, depth)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=5)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    best, best_state, since, epoch = float("inf"), None, 0, 0
    tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
    for epoch in range(1, max_epochs + 1):
        model.train()
        for b in tr_t[torch.randperm(len(tr_t), generator=gen)].split(batch):
            opt.zero_grad()
            loss_fn(model(Z[b]), Y[b]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = float(loss_fn(model(Z[va_t]), Y[va_t]))
        sched.step(val)
        if val < best - 1e-6:
            best, since = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        proba = torch.softmax(model(Z[torch.from_numpy(te)]), dim=1).numpy()
    pred, yt = proba.argmax(1), y[te]
    return {"seed": seed, "epochs": epoch, "accuracy": float(accuracy_score(yt, pred)),
            "auroc": macro_auroc(yt, proba, n_classes),
            # macro over the classes present in the test split or predicted (sklearn's default):
            # a class absent from a small test split must not count as F1 = 0
            "f1": float(f1_score(yt, pred, average="macro", zero_division=0)),
            "n_train": len(tr), "n_val": len(va), "n_test": len(te)}


def probe(features: np.ndarray, labels: Sequence[str], seeds: int = 10, **train_kw) -> dict:
    """The protocol over ``seeds`` seeds: mean ± std of accuracy, AUROC (macro OvR), F1 (macro)."""
    X = np.asarray(features, dtype=np.float64)
    classes, y = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    if len(classes) < 2:
        raise UsageError("the probe needs at least two classes")
    if len(y) < 10:
        raise UsageError(f"the probe needs at least 10 adapters for a 70/10/20 split, got {len(y)}")
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLP: threads cost more than they give
    t0 = time.perf_counter()
    try:
        runs = [train_one(X, y, len(classes), seed, **train_kw) for seed in range(seeds)]
    finally:
        torch.set_num_threads(prev)
    out = {"n": len(y), "dim": X.shape[1], "classes": classes.tolist(), "seeds": seeds,
           "chance": float(np.bincount(y).max() / len(y)), "runs": runs,
           "seconds": round(time.perf_counter() - t0, 3)}
    for key in ("accuracy", "auroc", "f1"):
        vals = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals))}
    return out


def probe_representations(reps: dict[str, np.ndarray], labels: Sequence[str], seeds: int = 10,
                          **train_kw) -> dict:
    """Run the probe for each named representation; one versioned object (``kind: probe``)."""
    return {"version": JSON_VERSION, "kind": "probe", "protocol": "LoRA-WS Table 1: 70/10/20, MLP 3x512",
            "methods": {name: probe(X, labels, seeds, **train_kw) for name, X in reps.items()}}


def format_table(result: dict) -> str:
    rows = [[m, f"{r['n']}", f"{r['dim']}",
             *(f"{100 * r[k]['mean']:.1f} ± {100 * r[k]['std']:.1f}" for k in ("accuracy", "auroc", "f1")),
             f"{100 * r['chance']:.1f}"] for m, r in result["methods"].items()]
    head = ["representation", "n", "dim", "accuracy", "AUROC", "F1 (macro)", "majority"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines) + "\n"
