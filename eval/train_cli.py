"""``lorasearch train``: train a learned encoder (or fit a baseline) on a collection folder.

It lives in the eval package because it wires eval's retrieval metrics into training as the
evaluator callable: ``encoders.train`` never imports eval, and the package proper
(``lorasearch/``) imports neither; ``lorasearch.cli`` attaches this command by name."""
from __future__ import annotations

import json

import click

from lorasearch.cli_common import fail
from lorasearch.errors import LorasearchError
from lorasearch.results import envelope

FITTED = ("flatvec_pca", "flatvec", "stats_layer", "stats_layer_dense")


@click.command("train")
@click.option("--encoder", "encoder", type=click.Choice(["w2t", "glnet", "subspace", *FITTED]), default="w2t",
              show_default=True, help="w2t / glnet are trained; subspace and the baselines are fitted (numpy).")
@click.option("--collection", required=True, type=click.Path(file_okay=False),
              help="Folder with manifest.parquet (id, path, label, role, …).")
@click.option("--out", required=True, type=click.Path(), help="Checkpoint folder to write.")
@click.option("--objective", type=click.Choice(["supcon", "classify", "regress"]), default="supcon", show_default=True)
@click.option("--epochs", default=30, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--weight-decay", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--val-frac", default=0.15, show_default=True, help="Validation share (stratified by label).")
@click.option("--patience", default=8, show_default=True, help="Early stopping patience in epochs.")
@click.option("--label-column", default="label", show_default=True)
@click.option("--target", default=None, help="Numeric column for --objective regress (e.g. accuracy).")
@click.option("--role", "roles", multiple=True, help="Train only on rows with this role (repeatable).")
@click.option("--holdout", multiple=True, help="Leave this label out of training (repeatable), for held-out eval.")
@click.option("--hidden", default=None, type=int, help="Model width (paper: 128).")
@click.option("--distill", default=0.0, show_default=True,
              help="Weight of matching embedding cosines to exact ΔW cosines (helps on unseen labels).")
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option("--k", "k", default=200, show_default=True, help="PCA components for flatvec_pca.")
@click.option("--lam", default=0.6, show_default=True,
              help="subspace: whitening shrinkage λ (1 = no whitening; 0.6 won on language-x validation).")
@click.option("--subspace-k", default=12, show_default=True,
              help="subspace: left/right subspace size per adapted weight (features: k² each).")
@click.option("--threads", default=None, type=int, help="torch CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the training summary as JSON.")
def train(encoder, collection, out, objective, epochs, batch_size, lr, weight_decay, seed, device, val_frac,
          patience, label_column, target, roles, holdout, hidden, distill, augment, k, lam, subspace_k, threads,
          as_json):
    """Train ENCODER on a collection and write a checkpoint folder usable as --encoder NAME:OUT."""
    try:
        if encoder == "subspace":
            summary = _fit_subspace(collection, out, roles, holdout, label_column, lam, subspace_k, device)
        elif encoder in FITTED:
            summary = _fit_baseline(encoder, collection, out, roles, holdout, label_column, k, seed, device)
        else:
            from lorasearch.encoders.train import TrainConfig, train_collection

            cfg = TrainConfig(encoder=encoder, objective=objective, epochs=epochs, batch_size=batch_size, lr=lr,
                              weight_decay=weight_decay, seed=seed, device=device, val_frac=val_frac,
                              patience=patience, augment=augment, threads=threads, distill=distill,
                              model={"hidden": hidden} if hidden else {})
            from lorasearch.eval.retrieval import training_evaluator

            summary = train_collection(collection, out, cfg, label_column, roles, holdout, target,
                                       evaluator=training_evaluator())
    except LorasearchError as e:      # also when the command runs on its own, outside the main group
        fail(f"error: {e}", e.exit_code)
    summary = envelope({"checkpoint": str(out), "encoder": encoder, **summary})
    if as_json:
        click.echo(json.dumps(summary))
    else:
        fin = summary.get("final") or {}
        click.echo(f"wrote {out}  ({encoder}; " + ", ".join(f"{k}={v:.4f}" for k, v in fin.items()) + ")")


def _fit_baseline(name, collection, out, roles, holdout, label_column, k, seed, device) -> dict:
    from lorasearch.encoders.baselines import FlatVec, FlatVecPCA, StatsLayer, StatsLayerDense
    from lorasearch.encoders.train import load_collection

    canon, _, _, rows = load_collection(collection, label_column, tuple(roles), tuple(holdout), None, device)
    cls = {"flatvec": FlatVec, "flatvec_pca": FlatVecPCA, "stats_layer": StatsLayer,
           "stats_layer_dense": StatsLayerDense}[name]
    enc = cls(k=k, seed=seed) if cls is FlatVecPCA else cls()
    enc.fit(canon)
    enc.save(out, card=f"# {name}\n\nFitted by `lorasearch train --encoder {name}` on `{collection}` "
                       f"({len(rows)} adapters, family {enc.family}); dim {enc.dim}.\n")
    return {"n_train": len(rows), "families": [enc.family], "dim": enc.dim, "final": {}}


def _fit_subspace(collection, out, roles, holdout, label_column, lam, k, device) -> dict:
    """The subspace encoder fitted on every adapter of the collection that learned (rows marked
    ``learned: false`` have no task to whiten against), one base-model family."""
    import numpy as np

    from lorasearch.encoders.subspace import fit
    from lorasearch.encoders.train import load_collection
    from lorasearch.errors import UsageError
    from lorasearch.similarity import factors

    canon, labels, _, rows = load_collection(collection, label_column, tuple(roles), tuple(holdout), None, device)
    keep = [i for i, r in enumerate(rows) if r.get("learned") is not False]
    fams = sorted({canon[i].family for i in keep})
    if len(fams) != 1:
        raise UsageError(f"{collection}: subspace fits one base-model family at a time (found {', '.join(fams) or 'none'})")
    lab = np.array([labels[i] for i in keep])
    if len(set(lab.tolist())) < 2:
        raise UsageError(f"{collection}: subspace needs at least two labels in {label_column!r} to whiten against")
    enc = fit([factors(canon[i]) for i in keep], lab, np.arange(len(keep)), k=k, lam=lam)
    extra = {"families": fams, "retrieval": {"fusion_weight": 0.0, "depth": 50},
             "training": {"collection": str(collection), "adapters": len(keep), "label_column": label_column,
                          "labels": sorted(set(lab.tolist())), "lambda": lam, "k": k, "holdout": list(holdout)}}
    enc.save(out, extra=extra, card=f"# subspace\n\nFitted by `lorasearch train --encoder subspace` on `{collection}` "
             f"({len(keep)} adapters, {len(set(lab.tolist()))} labels in {label_column!r}, family {fams[0]}, λ = {lam}); "
             f"dim {enc.dim}. `query` re-ranks its candidates by the exact ΔW cosine (fusion weight 0).\n")
    return {"n_train": len(keep), "families": fams, "dim": enc.dim, "final": {}}
