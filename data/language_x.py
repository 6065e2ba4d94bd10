"""The ``language-x`` collection: MiniLM LoRAs over labelling functions × text pools (``lfpools``).

Adapter ``i`` is a pure function of ``(seed, i)``: its task (LF × pool, cycling through a seeded
shuffle of all pairs, so any prefix of the collection covers the LFs evenly), its shots
(1/4/16/64 per class or the full data), rank (2–32), alpha, learning rate, steps and target
modules (query+value, value only, query+key+value). Adapters are trained ``chunk`` at a time by
the batched trainer; every chunk is a shard (``shards/shard-NNNNN.parquet``, written after its
adapter folders), so an interrupted run resumes where it stopped and a larger ``--n`` extends the
collection. After every shard ``manifest.parquet``, ``labels.csv`` and ``summary.json`` cover all
shards so far. An adapter whose held-out accuracy is within ``LEARNED_MARGIN`` of chance is kept,
with ``learned: false`` in the manifest (``hyperparameters`` JSON), never silently mixed in.

    lorasearch data make language-x --out data/collections/language-x --n 1500 --seed 0 --device cpu
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch

from lorasearch.data.language import RunSpec, TaskData, task_data, train_batched

SHOTS = (1, 4, 16, 64, None)            # examples per class; None = full data (N_FULL examples)
RANKS = (2, 4, 8, 16, 32)
TARGET_SETS = {"qv": ("query", "value"), "v": ("value",), "qkv": ("query", "key", "value")}
N_FULL = 192
N_TEST = 64
LEARNED_MARGIN = 0.15                   # 2.4 σ of a coin flip's accuracy over 64 held-out texts
HEAD_LR = 1e-2
PRESETS = {"cpu": dict(steps=(12, 20), batch=8, chunk=24), "gpu": dict(steps=(60, 120), batch=16, chunk=256),
           "tiny": dict(steps=(2, 3), batch=4, chunk=8)}


def is_qkv(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("query", "key", "value")


def task_order(seed: int) -> list[tuple[str, str]]:
    from lorasearch.data.lfpools import lfs, pools
    pairs = [(lf, p) for lf in lfs() for p in pools()]
    random.Random(f"language-x/tasks/{seed}").shuffle(pairs)
    return pairs


def adapter_spec(seed: int, i: int, order: list[tuple[str, str]], preset: str = "cpu") -> dict:
    """Everything about adapter ``i`` (deterministic in ``(seed, i)``)."""
    p = PRESETS[preset]
    rng = random.Random(f"language-x/{seed}/{i}")
    lf, pool = order[i % len(order)]
    rank = rng.choice(RANKS)
    shots = SHOTS[(i // len(order) + rng.randrange(len(SHOTS))) % len(SHOTS)]
    tset = rng.choice(tuple(TARGET_SETS))
    spec = RunSpec(task=f"{lf}@{pool}", rank=rank, alpha=float(rank * rng.choice((1, 2))),
                   lr=round(math.exp(rng.uniform(math.log(1e-3), math.log(8e-3))), 6),
                   steps=rng.randint(*p["steps"]), dropout=0.0, seed=rng.randrange(2**31),
                   batch_size=p["batch"], shots=shots, n_train=N_FULL, data_seed=rng.randrange(2**31))
    return dict(id=f"x{i:05d}-{lf}-{pool}", lf=lf, pool=pool, targets=tset, spec=spec,
                role="query" if rng.random() < 0.2 else "gallery")


def _shard_path(out: Path, k: int) -> Path:
    return out / "shards" / f"shard-{k:05d}.parquet"


def train_shard(entries: list[dict], device: str, n_test: int) -> list[dict]:
    """Train one shard's adapters together; returns manifest rows (files written by the caller)."""
    from lorasearch.data.lfpools import lfs, make_task

    datas: list[TaskData] = []
    for e in entries:
        s, task = e["spec"], make_task(e["lf"], e["pool"])
        datas.append(task_data(task, s.data_seed, s.n_train if s.shots is None else s.shots * len(task.labels), n_test))
    results = train_batched([e["spec"] for e in entries], datas, device=device, target=is_qkv,
                            targets=[TARGET_SETS[e["targets"]] for e in entries], head_lr=HEAD_LR)
    rows = []
    for e, d, res in zip(entries, datas, results):
        chance = 1.0 / d.n_labels
        learned = bool(res.accuracy >= chance + LEARNED_MARGIN)
        s = e["spec"]
        hp = dict(s.to_dict(), targets=list(TARGET_SETS[e["targets"]]), lf=e["lf"], pool=e["pool"],
                  lf_kind=lfs()[e["lf"]].kind, learned=learned, chance=round(chance, 4), head_lr=HEAD_LR,
                  n_test=len(d.test_y))
        rows.append(dict(id=e["id"], path=f"adapters/{e['id']}", suite="language-x", label=e["lf"], task=s.task,
                         lf=e["lf"], pool=e["pool"], learned=learned, targets=e["targets"],
                         role=e["role"], shots=s.shots, format="peft", rank=s.rank, alpha=s.alpha,
                         hyperparameters=hp, loss_curve=res.loss_curve, accuracy=res.accuracy,
                         test_loss=res.test_loss, factors=res.factors))
    return rows


def make_collection(out, n: int = 1500, seed: int = 0, device: str = "cpu", tiny: bool = False,
                    chunk: int | None = None, log=None, stop_after_s: float | None = None) -> dict:
    """Train (or resume) ``n`` adapters into ``out``; returns the summary."""
    from lorasearch.data.manifest import write_manifest
    from lorasearch.data.peft_io import save_peft_folder

    preset = "tiny" if tiny else "gpu" if str(device).startswith("cuda") else "cpu"
    chunk = chunk or PRESETS[preset]["chunk"]
    n_test = 16 if tiny else N_TEST
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "adapters").mkdir(exist_ok=True)
    order = task_order(seed)
    n_shards = math.ceil(n / chunk)
    t0 = time.time()
    done_now = 0
    for k in range(n_shards):
        if _shard_path(out, k).exists():
            continue
        if stop_after_s is not None and time.time() - t0 > stop_after_s:
            break
        entries = [adapter_spec(seed, i, order, preset) for i in range(k * chunk, min(n, (k + 1) * chunk))]
        rows = train_shard(entries, device, n_test)
        for r in rows:
            f = r.pop("factors")
            s = r["hyperparameters"]
            save_peft_folder(out / r["path"], f, r["rank"], r["alpha"], list(s["targets"]), 0.0)
        tmp = _shard_path(out, k).with_suffix(".tmp")
        write_manifest(rows, tmp.with_suffix(".tmp.parquet"))
        os.replace(tmp.with_suffix(".tmp.parquet"), _shard_path(out, k))
        done_now += len(rows)
        summary = merge(out, seed, device, preset)
        if log:
            el = time.time() - t0
            left = n - summary["adapters"]
            log(f"shard {k + 1}/{n_shards}: {summary['adapters']}/{n} adapters, {done_now} in {el:.0f} s "
                f"({60 * done_now / max(el, 1e-9):.1f}/min, ~{left * el / max(done_now, 1) / 60:.0f} min left), "
                f"learned {summary['learned_fraction']:.2f}")
    return merge(out, seed, device, preset, n_target=n)


def merge(out, seed: int = 0, device: str = "cpu", preset: str = "cpu", n_target: int | None = None) -> dict:
    """``manifest.parquet`` + ``labels.csv`` + ``summary.json`` over every finished shard."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    shards = sorted((out / "shards").glob("shard-*.parquet"))
    rows = pa.concat_tables([pq.read_table(s) for s in shards]).to_pylist() if shards else []
    if rows:
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shards[0])), out / "manifest.tmp.parquet",
                       compression="zstd")
        os.replace(out / "manifest.tmp.parquet", out / "manifest.parquet")
    with open(out / "labels.csv.tmp", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "label", "shots"])
        w.writerows(sorted((r["id"], r["lf"], "" if r["shots"] is None else r["shots"]) for r in rows))
    os.replace(out / "labels.csv.tmp", out / "labels.csv")
    per_lf: dict = {}
    for r in rows:
        d = per_lf.setdefault(r["lf"], {"adapters": 0, "learned": 0, "pools": set()})
        d["adapters"] += 1
        d["learned"] += bool(r["learned"])
        d["pools"].add(r["pool"])
    summary = dict(suite="language-x", adapters=len(rows), target=n_target, seed=seed, device=str(device),
                   preset=preset, shards=len(shards), lfs=len(per_lf), pools=len({r["pool"] for r in rows}),
                   learned_fraction=round(sum(bool(r["learned"]) for r in rows) / max(len(rows), 1), 4),
                   per_lf={k: dict(v, pools=len(v["pools"])) for k, v in sorted(per_lf.items())},
                   command=f"lorasearch data make language-x --out {out} --n {n_target or len(rows)} "
                           f"--seed {seed} --device {device}" + (" --tiny" if preset == "tiny" else ""))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_readme(out, summary)
    return summary


def write_readme(out: Path, summary: dict) -> None:
    from lorasearch.data.lfpools import lfs, pools

    L = [f"# language-x: labelling functions × text pools ({summary['adapters']} adapters so far)", "",
         "MiniLM (all-MiniLM-L6-v2) LoRAs, one per (labelling function, pool, hyperparameters), made on CPU by",
         "the batched trainer (`lorasearch.data.language_x`). Regenerate / resume / extend with", "",
         f"    {summary['command']}", "",
         f"{len(lfs())} labelling functions ({', '.join(sorted({lf.kind for lf in lfs().values()}))}) × "
         f"{len(pools())} pools ({', '.join(pools())}); shots 1/4/16/64 per class or {N_FULL} examples; "
         f"rank {'/'.join(map(str, RANKS))}, alpha r or 2r, lr log-uniform [1e-3, 8e-3], target modules "
         f"{' / '.join(TARGET_SETS)}; held-out accuracy on {N_TEST} texts. `learned` = accuracy ≥ chance + "
         f"{LEARNED_MARGIN} ({summary['learned_fraction']:.0%} so far); the others are kept and marked.", "",
         "`manifest.parquet`: one row per adapter (id, path, lf, pool, task = lf@pool, shots, rank, alpha, targets,",
         "learned, accuracy, loss curve, every hyperparameter in `hyperparameters`). `labels.csv`: id, LF, shots.", "",
         "| LF | kind | adapters | learned | pools |", "|---|---|---|---|---|"]
    for name, v in summary["per_lf"].items():
        L.append(f"| {name} | {lfs()[name].kind} | {v['adapters']} | {v['learned']} | {v['pools']} |")
    (Path(out) / "README.md").write_text("\n".join(L) + "\n")
