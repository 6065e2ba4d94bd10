"""Training W2T and GL-net: the papers' objectives plus a retrieval-specific one.

    classify   cross-entropy on the label (an MLP head on the embedding), as in W2T / GL-net
    regress    MSE on a z-scored numeric column (e.g. held-out accuracy), as W2T's performance model
    supcon     supervised contrastive on the L2-normalized embedding itself: positives = same
               label, every other label in the batch a negative, negatives re-weighted towards the
               hard ones (weight ∝ exp(β·sim), Robinson et al. 2021), batches built from groups of
               same-label adapters so every anchor has positives

``distill`` (optional, any objective) adds λ·mean_{i≠j}(cos(z_i, z_j) − cos(ΔW_i, ΔW_j))² over the
batch: the exact ΔW geometry as a label-free anchor, which is what carries over to tasks or classes
never seen in training.

Augmentation for encoders that are not invariant by construction (``augment.py``): random
GL(r) reparameterization, rank padding and fp16/bf16 rounding, re-canonicalized, plus sign
flips of rank tokens. Optimizer as W2T: AdamW (lr 1e-3, wd 1e-3), linear warm-up then cosine
to 1e-5, gradient clipping at 1.0. Early stopping on a validation split (val NDCG@10 for
supcon, val loss otherwise), keeping the best weights. Deterministic for a seed on CPU.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorasearch.encoders.augment import augment_canonical, flip_signs
from lorasearch.encoders.checkpoint import model_classes, resolve_device, save_model
from lorasearch.encoders.tokenize import tokenize
from lorasearch.errors import BadAdapterError, UsageError
from lorasearch.types import CanonicalAdapter

OBJECTIVES = ("supcon", "classify", "regress")


@dataclass
class TrainConfig:
    encoder: str = "w2t"
    objective: str = "supcon"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: int = 2
    seed: int = 0
    device: str = "auto"
    val_frac: float = 0.15
    patience: int = 8
    temperature: float = 0.1
    hard_beta: float = 1.0        # 0 = plain SupCon
    group_size: int = 4           # same-label adapters per group in a supcon batch
    distill: float = 0.0          # weight of matching in-batch embedding cosines to the dense ΔW cosines
    augment: bool = True
    aug_p: float = 0.5
    model: dict = field(default_factory=dict)   # constructor arguments of the model (paper defaults)
    threads: int | None = None


def _heads(objective: str, dim: int, n_out: int) -> nn.Module | None:
    if objective == "supcon":
        return None
    return nn.Sequential(nn.Linear(dim, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, n_out))


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, beta: float = 1.0) -> torch.Tensor:
    """Supervised contrastive loss on normalized ``z`` with hard-negative re-weighting.

    For anchor i and positive p: −log(e^{s_ip} / (e^{s_ip} + Σ_n w_in e^{s_in})), with
    s = cos/τ and w_in = e^{β s_in} / mean_n e^{β s_in} (detached): β = 0 is plain SupCon.
    Anchors without a positive in the batch are skipped.
    """
    s = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    neg = labels[:, None] != labels[None, :]
    w = torch.zeros_like(s)
    if neg.any():
        bs = (beta * s.detach()).masked_fill(~neg, -torch.inf)
        w = torch.softmax(bs, dim=1) * neg.sum(1, keepdim=True)      # mean weight 1 over negatives
        w = torch.nan_to_num(w) * neg
    shifted = s - s.detach().max()                                   # for stability; cancels below
    log_neg = torch.log((w * torch.exp(shifted)).sum(1, keepdim=True).clamp_min(1e-30))  # no negatives: ~-69
    log_prob = shifted - torch.logaddexp(shifted, log_neg)
    has = pos.any(1)
    if not has.any():
        return s.sum() * 0.0
    per_anchor = -torch.where(pos, log_prob, 0.0).sum(1)[has] / pos.sum(1)[has]
    return per_anchor.mean()


def split_indices(n: int, labels: np.ndarray | None, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified by label when there are labels; every label keeps at least 2 training items."""
    rng = np.random.default_rng(seed)
    if val_frac <= 0:
        return np.arange(n), np.zeros(0, int)
    if labels is None:
        perm = rng.permutation(n)
        k = int(round(val_frac * n))
        return np.sort(perm[k:]), np.sort(perm[:k])
    tr, va = [], []
    for lab in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        k = min(int(round(val_frac * len(idx))), max(0, len(idx) - 2))
        va += idx[:k].tolist()
        tr += idx[k:].tolist()
    return np.sort(tr), np.sort(va)


def _hard_batches(train_idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, cfg: TrainConfig,
                  rng: np.random.Generator):
    """Supcon batches for unseen tasks (issue 11): a batch picks one group (e.g. a text pool) and
    several labels (labelling functions) present in it; each label brings one adapter from that
    group plus ``group_size - 1`` of the same label from other groups. Same group, other label =
    hard negatives (what the pool looks like must not count); same label, other group = positives."""
    tr = np.asarray(train_idx)
    if len(tr) < 2:
        return []
    by_lab = {lab: tr[labels[tr] == lab] for lab in sorted(set(labels[tr].tolist()))}
    per_batch = max(2, cfg.batch_size // cfg.group_size)
    out = []
    for _ in range(max(1, len(tr) // cfg.batch_size)):
        g = groups[rng.choice(tr)]
        labs = sorted({labels[i] for i in tr if groups[i] == g})
        labs = [labs[j] for j in rng.permutation(len(labs))[:per_batch]]
        batch = []
        for lab in labs:
            idx = by_lab[lab]
            same = idx[groups[idx] == g]
            other = idx[groups[idx] != g]
            batch.append(rng.choice(same))
            if len(other):
                batch += rng.choice(other, size=min(cfg.group_size - 1, len(other)), replace=False).tolist()
        out.append(np.asarray(batch))
    return out


def _batches(train_idx: np.ndarray, labels: np.ndarray | None, cfg: TrainConfig, rng: np.random.Generator,
             groups: np.ndarray | None = None):
    if cfg.objective == "supcon" and labels is not None and groups is not None:
        return _hard_batches(train_idx, labels, groups, cfg, rng)
    if cfg.objective != "supcon" or labels is None:
        perm = rng.permutation(train_idx)
        return [perm[i:i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
    groups = []
    for lab in sorted(set(labels[train_idx].tolist())):
        idx = rng.permutation(train_idx[labels[train_idx] == lab])
        groups += [idx[i:i + cfg.group_size] for i in range(0, len(idx), cfg.group_size)]
    order = rng.permutation(len(groups))
    flat = np.concatenate([groups[i] for i in order]) if groups else np.zeros(0, int)
    return [flat[i:i + cfg.batch_size] for i in range(0, len(flat), cfg.batch_size)]


@torch.no_grad()
def embed(model: nn.Module, adapters: list[CanonicalAdapter], device, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    proj = model.config["proj_dim"]
    return torch.cat([model(tokenize(adapters[i:i + batch_size], proj).to(device)).float().cpu()
                      for i in range(0, len(adapters), batch_size)])


# An evaluator scores held-out embeddings during training: ``evaluator(q_emb, g_emb, q_labels,
# g_labels) -> {"ndcg@10": …, "hit@1": …}`` (float32 numpy arrays, label arrays). It is passed in
# (``lorasearch.eval.retrieval.training_evaluator`` for the CLI) so training never imports eval.
Evaluator = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], dict]


def distill_loss(z: torch.Tensor, dense_cos: torch.Tensor) -> torch.Tensor:
    """Mean squared gap between the embeddings' cosines and the dense ΔW cosines, off the diagonal."""
    zn = F.normalize(z, dim=1)
    off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    return ((zn @ zn.T - dense_cos) ** 2)[off].mean()


def _objective_loss(cfg, model, head, batch, y, dense_cos=None):
    z = model(batch)
    if cfg.objective == "supcon":
        loss = supcon_loss(F.normalize(z, dim=1), y, cfg.temperature, cfg.hard_beta)
    elif cfg.objective == "classify":
        loss = F.cross_entropy(head(z), y)
    else:
        loss = F.mse_loss(head(z).squeeze(1), y)
    if dense_cos is not None:
        loss = loss + cfg.distill * distill_loss(z, dense_cos)
    return loss


def train_encoder(adapters: list[CanonicalAdapter], cfg: TrainConfig, labels: list[str] | None = None,
                  targets: list[float] | None = None, log: Callable[[str], None] | None = None,
                  evaluator: Evaluator | None = None, groups: list[str] | None = None,
                  split: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Train a model on canonical adapters; returns {model, head, history, summary}.

    ``labels`` drive supcon/classify; ``targets`` drive regress. ``evaluator`` (see ``Evaluator``)
    adds ``val_<metric>`` retrieval numbers each epoch; with one, supcon early-stops on
    ``val_ndcg@10``, without one on ``val_loss``. ``groups`` (e.g. the text pool of each adapter)
    switches supcon to hard-negative batches (``_hard_batches``). ``split`` = (train, val) indices
    instead of the stratified split, e.g. validation *labels* never trained on: the validation
    adapters are then retrieved among themselves (``evaluator(q, q, …)``; it must skip self-matches).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if cfg.objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {cfg.objective!r}; use {', '.join(OBJECTIVES)}")
    if cfg.objective in ("supcon", "classify") and labels is None:
        raise UsageError(f"objective {cfg.objective} needs labels")
    if cfg.objective == "regress" and targets is None:
        raise UsageError("objective regress needs a numeric target column")
    if len(adapters) < 4:
        raise UsageError(f"training needs at least 4 adapters, got {len(adapters)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    lab = np.asarray(labels) if labels is not None else None
    classes = sorted(set(lab.tolist())) if lab is not None else []
    tr, va = split if split is not None else split_indices(len(adapters), lab, cfg.val_frac, cfg.seed)
    tr, va = np.asarray(tr, int), np.asarray(va, int)
    grp = np.asarray(groups) if groups is not None else None
    y_all: torch.Tensor
    t_mean = t_std = None
    if cfg.objective == "regress":
        t = np.asarray(targets, np.float64)
        t_mean, t_std = float(t[tr].mean()), float(t[tr].std() + 1e-8)
        y_all = torch.tensor((t - t_mean) / t_std, dtype=torch.float32)
    else:
        y_all = torch.tensor([classes.index(x) for x in lab], dtype=torch.long)

    model_cls, _ = model_classes(cfg.encoder)
    model = model_cls(**cfg.model).to(device)
    head = _heads(cfg.objective, model.dim, len(classes) if cfg.objective == "classify" else 1)
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    if head is not None:
        head.to(device)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(_batches(tr, lab, cfg, np.random.default_rng(0), grp)))
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        p = (step - warm) / max(1, total - warm)
        return (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * p))) / cfg.lr

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    use_gl = not model_cls.invariant_by_construction
    tr_adapters = [adapters[i] for i in tr]
    va_adapters = [adapters[i] for i in va]

    def evaluate() -> dict:
        out: dict = {}
        model.eval()
        if head is not None:
            head.eval()
        if len(va):
            with torch.no_grad():
                zs = embed(model, va_adapters, device).to(device)
                y = y_all[va].to(device)
                if cfg.objective == "supcon":
                    out["val_loss"] = float(supcon_loss(F.normalize(zs, dim=1), y, cfg.temperature, cfg.hard_beta))
                elif cfg.objective == "classify":
                    logits = head(zs)
                    out["val_loss"] = float(F.cross_entropy(logits, y))
                    out["val_acc"] = float((logits.argmax(1) == y).float().mean())
                else:
                    out["val_loss"] = float(F.mse_loss(head(zs).squeeze(1), y))
            if lab is not None and evaluator is not None:
                q = F.normalize(zs.float().cpu(), dim=1).numpy()
                if split is not None:
                    out.update({f"val_{k}": float(v) for k, v in evaluator(q, q, lab[va], lab[va]).items()})
                else:
                    g = F.normalize(embed(model, tr_adapters, device), dim=1).numpy()
                    out.update({f"val_{k}": float(v) for k, v in evaluator(q, g, lab[va], lab[tr]).items()})
        return out

    history = [{"epoch": 0, "train_loss": None, **evaluate(), "seconds": 0.0}]
    log(f"[train] {cfg.encoder}/{cfg.objective}: {len(tr)} train, {len(va)} val, {len(classes)} labels, "
        f"device {device}; init " + _fmt(history[0]))
    monitor = "val_ndcg@10" if cfg.objective == "supcon" and "val_ndcg@10" in history[0] else "val_loss"
    sign = -1.0 if monitor == "val_ndcg@10" else 1.0
    best = (sign * history[0][monitor]) if monitor in history[0] else math.inf
    best_state = _snapshot(model, head)
    best_epoch, bad, t0 = 0, 0, time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        if head is not None:
            head.train()
        losses = []
        for bidx in _batches(tr, lab, cfg, rng, grp):
            if len(bidx) < 2:
                continue
            batch_ads = [adapters[i] for i in bidx]
            if cfg.augment:
                batch_ads = augment_canonical(batch_ads, rng, p=cfg.aug_p, gl=use_gl)
            b = tokenize(batch_ads, model.config["proj_dim"])
            if cfg.augment and cfg.encoder == "w2t":
                b.u, b.v = flip_signs(b.u, b.v, b.rank_mask, gen)
            dense = None
            if cfg.distill > 0:   # on the un-augmented factors: augmentation keeps ΔW
                from lorasearch.similarity import pairwise_dense_cosine
                orig = [adapters[i] for i in bidx]
                dense = torch.from_numpy(pairwise_dense_cosine(orig, orig, device="cpu")).float().to(device)
            loss = _objective_loss(cfg, model, head, b.to(device), y_all[bidx].to(device), dense)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
               "lr": opt.param_groups[0]["lr"], **evaluate(), "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        log(f"[train] epoch {epoch}/{cfg.epochs} " + _fmt(row))
        if monitor in row:
            score = sign * row[monitor]
            if score < best - 1e-6:
                best, best_epoch, bad, best_state = score, epoch, 0, _snapshot(model, head)
            else:
                bad += 1
                if bad >= cfg.patience:
                    log(f"[train] early stop at epoch {epoch}: best {monitor} at epoch {best_epoch}")
                    break
        else:
            best_epoch, best_state = epoch, _snapshot(model, head)
    model.load_state_dict(best_state[0])
    if head is not None:
        head.load_state_dict(best_state[1])
    final = evaluate()
    summary = {"objective": cfg.objective, "n_train": int(len(tr)), "n_val": int(len(va)), "classes": classes,
               "best_epoch": best_epoch, "epochs_run": len(history) - 1, "train_seconds": round(time.perf_counter() - t0, 2),
               "device": str(device), "init": {k: v for k, v in history[0].items() if k.startswith("val_")},
               "final": final, "target_mean": t_mean, "target_std": t_std}
    return {"model": model.eval().cpu(), "head": head.cpu() if head is not None else None,
            "history": history, "summary": summary}


def _snapshot(model, head):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: v.detach().clone() for k, v in head.state_dict().items()} if head is not None else None)


def _fmt(row: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                    if k not in ("epoch",) and v is not None)


# ---------------------------------------------------------------------------------------------
# Collections on disk

def load_collection(collection, label_column: str = "label", roles: tuple[str, ...] = (),
                    holdout: tuple[str, ...] = (), target: str | None = None, device: str = "auto",
                    log: Callable[[str], None] | None = None):
    """Read ``manifest.parquet`` of a collection and canonicalize its adapters.

    Rows re-encoding another adapter (``variant_of``) are skipped: they are the same ΔW.
    Returns (canonical adapters, labels, targets, rows).
    """
    from lorasearch.adapters import load_adapter
    from lorasearch.canonical import canonicalize_many
    from lorasearch.data.manifest import read_manifest

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    root = Path(collection)
    rows = read_manifest(root)
    if rows and label_column not in rows[0]:
        raise BadAdapterError(root / "manifest.parquet", f"no column {label_column!r}")
    keep = [r for r in rows if not r.get("variant_of") and (not roles or r.get("role") in roles)
            and str(r.get(label_column)) not in set(holdout)]
    if target:
        if rows and target not in rows[0]:
            raise BadAdapterError(root / "manifest.parquet", f"no column {target!r}")
        keep = [r for r in keep if r.get(target) is not None and not math.isnan(float(r[target]))]
    if not keep:
        raise UsageError(f"{root}: no adapters left after filtering (roles={list(roles)}, holdout={list(holdout)})")
    log(f"[train] reading {len(keep)} adapters from {root}")
    raws = [load_adapter(root / r["path"]) for r in keep]
    canon = canonicalize_many(raws, device=device)
    labels = [str(r.get(label_column)) for r in keep]
    targets = [float(r[target]) for r in keep] if target else None
    return canon, labels, targets, keep


def card_text(cfg: TrainConfig, summary: dict, collection: str, extra: str = "") -> str:
    init, fin = summary["init"], summary["final"]
    lines = [f"# {cfg.encoder} checkpoint ({cfg.objective})", "",
             f"Trained by `lorasearch train` on `{collection}`: {summary['n_train']} adapters "
             f"({summary['n_val']} held out for validation), labels: {', '.join(summary['classes']) or '-'}.",
             f"Families: {', '.join(summary.get('families', []))}. Epochs run {summary['epochs_run']} "
             f"(best {summary['best_epoch']}), {summary['train_seconds']} s on {summary['device']}, seed {cfg.seed}.", ""]
    if fin:
        lines += ["| validation | at init | trained |", "|---|---|---|"]
        lines += [f"| {k} | {init.get(k, float('nan')):.4f} | {v:.4f} |" for k, v in fin.items()]
    lines += ["", extra, "", "Hyperparameters: see config.json. Loss curve: loss_curve.json."]
    return "\n".join(lines) + "\n"


def train_collection(collection, out, cfg: TrainConfig, label_column: str = "label", roles=(), holdout=(),
                     target: str | None = None, log=None, evaluator: Evaluator | None = None) -> dict:
    """``lorasearch train``: read a collection, train, write the checkpoint folder."""
    canon, labels, targets, rows = load_collection(collection, label_column, tuple(roles), tuple(holdout),
                                                   target, cfg.device, log)
    res = train_encoder(canon, cfg, labels=labels, targets=targets, log=log, evaluator=evaluator)
    summary = res["summary"]
    summary["families"] = sorted({c.family for c in canon})
    extra = {"families": summary["families"], "training": {**asdict(cfg), "collection": str(collection),
             "label_column": label_column, "roles": list(roles), "holdout": list(holdout), "target": target,
             **{k: v for k, v in summary.items() if k not in ("families",)}}}
    save_model(out, cfg.encoder, res["model"], extra=extra, loss_curve=res["history"],
               card=card_text(cfg, summary, str(collection)))
    if res["head"] is not None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in res["head"].state_dict().items()}, str(Path(out) / "head.safetensors"))
    return summary
