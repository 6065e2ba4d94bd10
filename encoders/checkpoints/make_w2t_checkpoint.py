"""Make a shipped W2T checkpoint and its card: k-fold held-out-task retrieval, then a gallery-trained model.

    python encoders/checkpoints/make_w2t_checkpoint.py COLLECTION OUT FOLDS EPOCHS [THREADS]
    (env DISTILL=λ adds the dense-cosine distillation term; TAG prefixes the scratch files)

Each fold trains on the other labels and queries only its held-out labels (gallery restricted to
them, and the full gallery); the shipped model trains on the gallery role only and is scored on
every query adapter. Scratch folders go to /tmp/w2tship/. A benchmark script, not part of the API.
"""
import json, os, sys, time, shutil
os.makedirs('/tmp/w2tship', exist_ok=True)
import numpy as np, torch
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
from lorasearch.encoders.train import TrainConfig, train_collection, card_text
from lorasearch.eval import retrieval as R

coll, out, folds, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
hidden = 64
import os; DISTILL = float(os.environ.get("DISTILL", "0")); TAG = os.environ.get("TAG", "")
es_all = R.load(R.from_collection(coll))
labels = sorted({it.label for it in es_all.items})
rng = np.random.default_rng(0)
perm = [labels[i] for i in rng.permutation(len(labels))]
groups = [perm[i::folds] for i in range(folds)]
methods_base = ["sketch", "rawcos", "dense"]
rows = []
for f, held in enumerate(groups):
    ck = f"/tmp/w2tship/{TAG}fold{f}"
    t0 = time.time()
    s = train_collection(coll, ck, TrainConfig(encoder="w2t", epochs=epochs, batch_size=32, seed=0, device="cpu",
                         val_frac=0.2, patience=8, model={"hidden": hidden}, distill=DISTILL), holdout=held, log=lambda m: None,
                         evaluator=R.training_evaluator())
    secs = time.time() - t0
    for fg in (True, False):
        es = R.select_labels(es_all, include=held, filter_gallery=fg)
        res = R.evaluate(es, [f"w2t:{ck}"] + methods_base)
        row = {"fold": f, "held_out": held, "filter_gallery": fg, "train_seconds": round(secs, 1),
               "best_epoch": s["best_epoch"],
               **{m.split(":")[0]: res["methods"][m]["overall"]["ndcg@10"] for m in res["methods"]},
               "hit1_w2t": res["methods"][f"w2t:{ck}"]["overall"]["hit@1"],
               "hit1_sketch": res["methods"]["sketch"]["overall"]["hit@1"], "n_queries": res["n_queries"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
summ = {}
for fg in (True, False):
    sel = [r for r in rows if r["filter_gallery"] == fg]
    summ["heldout_gallery" if fg else "full_gallery"] = {m: round(float(np.mean([r[m] for r in sel])), 4)
        for m in ("w2t", "sketch", "rawcos", "dense", "hit1_w2t", "hit1_sketch")}
print(json.dumps(summ), flush=True)
json.dump({"folds": rows, "summary": summ}, open(f"/tmp/w2tship/{TAG}heldout.json", "w"), indent=1)
# the shipped model: every label
t0 = time.time()
cfg = TrainConfig(encoder="w2t", epochs=epochs, batch_size=32, seed=0, device="cpu", val_frac=0.2, patience=8,
                  model={"hidden": hidden}, distill=DISTILL)
s = train_collection(coll, out, cfg, roles=("gallery",), log=lambda m: print(m, file=sys.stderr),
                     evaluator=R.training_evaluator())
train_secs = time.time() - t0
res = R.evaluate(es_all, [f"w2t:{out}"] + methods_base)
seen = {m.split(":")[0]: res["methods"][m]["overall"] for m in res["methods"]}
per_shots = {m.split(":")[0]: res["methods"][m].get("per_shots", {}) for m in res["methods"]}
json.dump({"seen_tasks": seen, "per_shots": per_shots}, open(f"/tmp/w2tship/{TAG}seen.json", "w"), indent=1)
print(json.dumps({k: round(v["ndcg@10"], 4) for k, v in seen.items()}), flush=True)
import lorasearch.encoders as E
enc = E.get_encoder(f"w2t:{out}")
enc.batch_size = 64
canon = [it.canonical for it in es_all.items]
t1 = time.time(); enc.encode(canon); thr = len(canon) / (time.time() - t1)
table = ["## Retrieval: new few-shot query adapters against the gallery it was trained on", "",
         "This checkpoint was trained on the gallery adapters only (supcon on the task label"
         + (f" + {DISTILL} x dense-cosine distillation" if DISTILL else "") + "); every query adapter "
         "(1-256 shots, fixed hyperparameters) is new to it. All tasks were seen in training.", "",
         "| metric | w2t (this checkpoint) | sketch (default) | rawcos | dense ΔW cosine |", "|---|---|---|---|---|"]
for met in ("ndcg@10", "hit@1", "map@10"):
    table.append(f"| {met} | " + " | ".join(f"{seen[m][met]:.4f}" for m in ("w2t", "sketch", "rawcos", "dense")) + " |")
table += ["", f"Training: {train_secs:.0f} s on CPU ({torch.get_num_threads()} thread); embedding {thr:.0f} adapters/s on CPU.", ""]
table += ["## Retrieval on held-out tasks (same recipe, tasks left out of training)", "",
         f"{folds}-fold: each fold trains on the other tasks and queries only its held-out tasks "
         "(NDCG@10, mean over folds; W2T definition, binary gains).", "",
         "| gallery | w2t (this recipe) | sketch (default) | rawcos | dense ΔW cosine |", "|---|---|---|---|---|"]
for k, v in summ.items():
    table.append(f"| {k.replace('_', ' ')} | {v['w2t']:.4f} | {v['sketch']:.4f} | {v['rawcos']:.4f} | {v['dense']:.4f} |")
extra = "\n".join(table) + f"\n\nPer-fold rows: see heldout.json. Trained on CPU ({torch.get_num_threads()} thread(s)), {time.strftime('%Y-%m-%d')}.\n"
s["families"] = s.get("families", [])
(open(f"{out}/CARD.md", "w")).write(card_text(cfg, s, coll, extra))
shutil.copy(f"/tmp/w2tship/{TAG}heldout.json", f"{out}/heldout.json")
shutil.copy(f"/tmp/w2tship/{TAG}seen.json", f"{out}/seen.json")
print(json.dumps({k: v for k, v in s.items() if k != "classes"}))
