"""The evaluation report: one folder with report.md, results.json and PNG plots.

Plots: NDCG@10 per method, NDCG@10 by query shots, invariance drift and top-10 overlap curves,
and a 2-D PCA map of each encoder's embeddings coloured by label. ``headline_table`` is the
Markdown table (with machine and date) meant to be pasted into the README.
Figures are drawn with ``matplotlib.figure.Figure`` (Agg canvas, no display, no pyplot state).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from lorasearch.eval import retrieval as R
from lorasearch.results import envelope

_KEYS = ("ndcg@10", "hit@1", "map@10", "recall@10")


def embed_all(es: R.EvalSet, encoders: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Each encoder's embeddings of every adapter (gallery then queries) and their labels.

    Layout baselines (FlatVec …) are fitted on the gallery, so they need one family."""
    items = es.items
    canon = [it.canonical for it in items]
    gallery = [it.canonical for it in es.gallery]
    reps = {spec: np.asarray(R.encoder_for(spec, gallery).encode(canon), dtype=np.float32) for spec in encoders}
    return reps, [it.label for it in items]


def adapters_by_family(es: R.EvalSet, limit: int | None = None) -> dict[str, list]:
    """The parsed adapters (``canonical.raw``) of a loaded set, grouped by family; with ``limit``,
    at most that many per family, evenly spaced so every label stays represented."""
    out = defaultdict(list)
    for it in es.items:
        out[it.family].append(it.canonical.raw)
    if limit:
        out = {f: [a[i] for i in np.linspace(0, len(a) - 1, min(limit, len(a))).round().astype(int)]
               for f, a in out.items()}
    return dict(out)


def headline_table(retrieval: dict) -> str:
    """Markdown: one row per method, metrics ×100, with the machine and the date under it."""
    k = retrieval.get("k", 10)
    keys = [c.replace("10", str(k)) for c in _KEYS]
    lines = ["| method | " + " | ".join(c.upper().replace("MAP", "mAP").replace("HIT", "Hit")
                                       .replace("RECALL", "Recall") for c in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for m, r in retrieval["methods"].items():
        lines.append(f"| {m} | " + " | ".join(f"{100 * r['overall'].get(c, float('nan')):.2f}" for c in keys) + " |")
    if "chance" in retrieval:
        ch = retrieval["chance"]["overall"]
        lines.append("| (random ranking, expected) | " + " | ".join(f"{100 * ch.get(c, float('nan')):.2f}" for c in keys) + " |")
    src = retrieval.get("source", {})
    what = src.get("collection") or src.get("gallery") or ""
    lines.append("")
    lines.append(f"{retrieval['n_queries']} queries × {retrieval['n_gallery']} gallery adapters, "
                 f"{len(retrieval['labels'])} labels ({what}); {retrieval.get('machine', '')}, "
                 f"{retrieval.get('created', '')[:10]}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots

_MARKERS = "osD^vP*X<>"


def _style(i: int, name: str) -> dict:
    """Distinct marker per line, dashed for the references, so coinciding curves stay visible."""
    return {"marker": _MARKERS[i % len(_MARKERS)], "linestyle": "--" if name in R.REFERENCE_METHODS else "-",
            "markersize": 7 - (i % 3), "alpha": 0.85}


def _figure(w=6.0, h=4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def plot_ndcg_by_method(retrieval: dict, path: Path) -> Path:
    names = list(retrieval["methods"])
    vals = [100 * retrieval["methods"][m]["overall"].get("ndcg@10", 0.0) for m in names]
    fig = _figure()
    ax = fig.add_subplot()
    bars = ax.bar(names, vals, color=["#4c72b0" if retrieval["methods"][m]["kind"] == "encoder" else "#999999"
                                      for m in names])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("NDCG@10 (×100)")
    ax.set_ylim(0, 105)
    ax.set_title("Retrieval NDCG@10 by method (grey: references)")
    fig.savefig(path)
    return path


def plot_ndcg_by_shots(retrieval: dict, path: Path) -> Path | None:
    fig = _figure()
    ax = fig.add_subplot()
    drawn = False
    ticks = set()
    for i, (m, r) in enumerate(retrieval["methods"].items()):
        shots = {k: v for k, v in r.get("per_shots", {}).items() if k != "-" and "ndcg@10" in v}
        if not shots:
            continue
        xs = sorted(shots, key=float)
        ticks.update(float(x) for x in xs)
        ax.plot([float(x) for x in xs], [100 * shots[x]["ndcg@10"] for x in xs], label=m, **_style(i, m))
        drawn = True
    if not drawn:
        return None
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
    ax.set_xlabel("query shots")
    ax.set_ylabel("NDCG@10 (×100)")
    ax.legend()
    ax.set_title("NDCG@10 by query shots")
    fig.savefig(path)
    return path


def plot_invariance(inv: dict, path: Path) -> Path:
    fig = _figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for i, (m, r) in enumerate(inv["methods"].items()):
        ax1.plot(inv["strengths"], np.maximum(r["drift_mean"], 1e-18), label=m, **_style(i, m))
        ax2.plot(inv["strengths"], r["overlap"], label=m, **_style(i, m))
    ax1.set_yscale("log")
    ax1.set_xlabel(f"reparameterization strength t ({inv['mode']})")
    ax1.set_ylabel("mean drift 1 − cos")
    ax1.legend()
    ax2.set_xlabel("strength t")
    ax2.set_ylabel(f"top-{inv['k']} overlap")
    ax2.set_ylim(-0.02, 1.02)
    fig.suptitle(f"Invariance under B→BG, A→G⁻¹A ({inv['family']}, {inv['n_adapters']} adapters)")
    fig.savefig(path)
    return path


def pca_2d(X: np.ndarray) -> np.ndarray:
    Xc = np.asarray(X, dtype=np.float64) - np.mean(X, axis=0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    return Xc @ Vt[:2].T


def plot_pca(X: np.ndarray, labels: Sequence[str], roles: Sequence[str], title: str, path: Path) -> Path:
    P = pca_2d(X)
    labels = np.asarray(labels)
    roles = np.asarray(roles)
    fig = _figure(6.5, 5)
    ax = fig.add_subplot()
    import matplotlib

    names = sorted(set(labels))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    for i, lab in enumerate(names):
        for role, marker in (("gallery", "o"), ("query", "x")):
            sel = (labels == lab) & (roles == role)
            if sel.any():
                ax.scatter(P[sel, 0], P[sel, 1], s=14, marker=marker, color=cmap(i % 20),
                           label=lab if role == "gallery" or not ((labels == lab) & (roles == "gallery")).any() else None)
    ax.legend(fontsize=7, markerscale=1.2, loc="best")
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- the report

def build_report(es: R.EvalSet, encoders: Sequence[str], out_dir: str | Path, probe: bool = True,
                 invariance: bool = True, seeds: int = 10, title: str = "lorasearch evaluation",
                 device: str = "auto", invariance_adapters: int = 32, probe_kw: dict | None = None,
                 strengths: Sequence[float] | None = None) -> Path:
    """Run the protocols on a loaded set and write ``out_dir/report.md`` (returned)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(it.canonical is None for it in es.items):
        es = R.load(es, device=device)
    full = R.evaluate(es, list(encoders) + list(R.REFERENCE_METHODS))
    retrieval = R.public(full)
    results: dict = envelope({"kind": "report", "retrieval": retrieval})
    md = [f"# {title}", "", f"{retrieval['created']} on {retrieval['machine']}.", "",
          "## Retrieval", "",
          "Relevance = same label; only same-family pairs are ranked; metrics ×100. "
          "`dense` is the exact ΔW cosine, `rawcos` the raw-factor cosine (W2T baseline).", "",
          R.format_table(retrieval, markdown=True), ""]
    plot_ndcg_by_method(retrieval, out / "ndcg_by_method.png")
    md += ["![NDCG@10 by method](ndcg_by_method.png)", ""]
    if plot_ndcg_by_shots(retrieval, out / "ndcg_by_shots.png"):
        md += ["![NDCG@10 by shots](ndcg_by_shots.png)", ""]

    md += ["## Embedding maps", ""]
    for ms in full["_scored"]:
        for fam, (_names, labels, roles, X) in ms.embeddings.items():
            if len(X) < 3:
                continue
            fname = f"pca_{_slug(ms.name)}_{_slug(fam)}.png"
            plot_pca(X, labels, roles, f"{ms.name} embeddings, {fam} (PCA; o gallery, x query)", out / fname)
            md += [f"![{ms.name} PCA]({fname})", ""]

    if probe:
        from lorasearch.eval import probe as P

        reps, labs = embed_all(es, encoders)
        results["probe"] = P.probe_representations(reps, labs, seeds, **(probe_kw or {}))
        md += ["## Classification probe (LoRA-WS protocol)", "",
               "70/10/20 split, MLP 3×512, early stopping on validation loss; "
               f"mean ± std over {seeds} seeds (each its own split); ×100.", "",
               _probe_markdown(results["probe"]), ""]

    if invariance:
        from lorasearch.eval import invariance as I

        results["invariance"] = {}
        md += ["## Invariance under GL(r) reparameterization", ""]
        for fam, ads in adapters_by_family(es, invariance_adapters).items():
            if len(ads) < 2:
                continue
            inv = I.drift_curves(ads, list(encoders) + ["rawcos", "dense"],
                                 strengths or I.DEFAULT_STRENGTHS, device=device)
            results["invariance"][fam] = inv
            fname = f"invariance_{_slug(fam)}.png"
            plot_invariance(inv, out / fname)
            md += [f"Family `{fam}`, {inv['n_adapters']} adapters, G = expm(t·X):", "",
                   _invariance_markdown(inv), "", f"![invariance {fam}]({fname})", ""]

    md += ["## Headline table", "", headline_table(retrieval)]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)[:60]


def _probe_markdown(p: dict) -> str:
    lines = ["| representation | n | dim | accuracy | AUROC | F1 (macro) | majority |", "|---|---:|---:|---|---|---|---:|"]
    for m, r in p["methods"].items():
        cells = [f"{100 * r[k]['mean']:.1f} ± {100 * r[k]['std']:.1f}" for k in ("accuracy", "auroc", "f1")]
        lines.append(f"| {m} | {r['n']} | {r['dim']} | " + " | ".join(cells) + f" | {100 * r['chance']:.1f} |")
    return "\n".join(lines)


def _invariance_markdown(inv: dict) -> str:
    ts = inv["strengths"]
    lines = ["| method | " + " | ".join(f"drift t={t:g}" for t in ts) + f" | top-{inv['k']} overlap t={ts[-1]:g} |",
             "|---|" + "---:|" * (len(ts) + 1)]
    for m, r in inv["methods"].items():
        lines.append(f"| {m} | " + " | ".join(f"{d:.1e}" for d in r["drift_mean"]) + f" | {r['overlap'][-1]:.3f} |")
    lines.append("| cond(G) max | " + " | ".join(f"{c:.0f}" for c in inv["cond_max"]) + " | |")
    return "\n".join(lines)
