"""The diffusion suite (LoRA-WS in miniature): a collection of DreamBooth LoRAs on a tiny UNet.

    from lorasearch.data.diffusion import make_collection
    make_collection("collections/diffusion", n=2000, seed=0, device="cuda", tiny=False)

writes ``adapters/*.safetensors`` (fp16; diffusers ``unet.<path>.lora_A.weight`` keys, every tenth
adapter in kohya format) and ``manifest.parquet`` (one row per adapter: leaf, superclass, rank,
hyperparameters, loss curve, held-out loss). Adapters are balanced over the 10 superclasses and
cycle through each superclass's 20 leaves; 80% are rank 1 (alpha 1, as LoRA-WS), 10% rank 4 and
10% rank 8 (alpha = rank); every fifth adapter is a ``query``, the rest ``gallery``.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lorasearch.data import diffusion_base as DB
from lorasearch.data import images as I
from lorasearch.data.diffusion_lora import Job, routed, train_jobs
from lorasearch.errors import UnavailableError

FAMILY_TAG = "lorasearch_tinyunet_v1"   # written as ss_base_model_version in kohya files (not "sd_v1")
DEFAULTS = dict(steps=200, batch=4, lr=1e-2, chunk=256)          # GPU run (LoRA-WS: 200 steps)
TINY = dict(steps=12, batch=2, lr=1e-2, chunk=8)                 # tests: seconds on a CPU


def plan(n: int, seed: int, tiny: bool = False) -> list[dict]:
    """Which adapter is which: superclass i % 10, leaf cycling through a seeded permutation of
    that superclass's leaves, 4–15 images (tiny: 4), rank 1/4/8 (80/10/10), role query
    for every fifth, every tenth in kohya format — balanced within every superclass (the residues are chosen so that even the first
    four adapters cover every case)."""
    rng = np.random.default_rng(seed)
    ls = I.leaves()
    perms = [rng.permutation(I.LEAVES_PER_SUPERCLASS) for _ in I.SUPERCLASSES]
    rows = []
    for i in range(n):
        s, k = i % len(I.SUPERCLASSES), i // len(I.SUPERCLASSES)
        leaf = ls[s * I.LEAVES_PER_SUPERCLASS + int(perms[s][k % I.LEAVES_PER_SUPERCLASS])]
        # j = i + k skews the residues per superclass, so every superclass gets every rank, role
        # and format in the same proportions (with i alone, rank/format/role followed i % 10,
        # i.e. the superclass, and gave the label away).
        j = i + k
        rank = {1: 4, 6: 8}.get(j % 10, 1)
        k_img = int(rng.integers(4, 16))
        rows.append(dict(i=i, leaf=leaf, n_images=4 if tiny else k_img, rank=rank,
                         alpha=1.0 if rank == 1 else float(rank), role="query" if j % 5 == 2 else "gallery",
                         fmt="kohya" if j % 10 == 3 else "diffusers", seed=int(seed) * 1_000_003 + i))
    return rows


def _job(p: dict, lr: float, n_eval: int = 4) -> Job:
    leaf = p["leaf"]
    sib = I.leaves()[leaf.superclass_id * I.LEAVES_PER_SUPERCLASS + (leaf.id + 1) % I.LEAVES_PER_SUPERCLASS]
    return Job(leaf=leaf, images=I.leaf_images(leaf, p["n_images"], p["seed"]), seed=p["seed"],
               rank=p["rank"], alpha=p["alpha"], lr=lr,
               heldout=I.leaf_images(leaf, n_eval, p["seed"] + 500_000_000),
               sibling=I.leaf_images(sib, n_eval, p["seed"] + 700_000_000))


def adapter_of(ml, i: int, path: str = ""):
    """Adapter ``i`` of a trained ``MultiLora`` as a ``LoraAdapter`` with ``unet.``-prefixed names."""
    ad = ml.extract(i, family="sd-ctx384", path=path)
    for m in ad.modules:
        m.name = "unet." + m.name
    return ad


def _write(ad, path: Path, fmt: str, meta: dict) -> None:
    from lorasearch.adapters.writers import write_adapter
    extra = {"ss_base_model_version": FAMILY_TAG, "ss_v2": "False"} if fmt == "kohya" else {}
    write_adapter(ad, path, fmt, dtype="F16", metadata={**meta, **extra})


def make_collection(out: str, n: int, seed: int = 0, device: str = "cpu", tiny: bool = False, *,
                    steps: int | None = None, batch: int | None = None, lr: float | None = None,
                    chunk: int | None = None, log=None) -> Path:
    """Train ``n`` adapters (tiny: a handful in seconds) and write them plus ``manifest.parquet``
    under ``out``; returns the manifest's path."""
    from lorasearch.data.manifest import write_manifest
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnavailableError("--device cuda: no CUDA device is available")
    cfg = dict(TINY if tiny else DEFAULTS)
    for k, v in dict(steps=steps, batch=batch, lr=lr, chunk=chunk).items():
        if v is not None:
            cfg[k] = v
    n = n if not tiny else min(n, 4)
    out = Path(out)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    base = DB.load_base(device=device)
    rows, t0, cpu0 = [], time.time(), time.process_time()
    todo = plan(n, seed, tiny)
    for c0 in range(0, n, cfg["chunk"]):
        part = todo[c0:c0 + cfg["chunk"]]
        jobs = [_job(p, cfg["lr"], n_eval=2 if tiny else 4) for p in part]
        ml = train_jobs(copy.deepcopy(base), jobs, steps=cfg["steps"], batch=cfg["batch"], device=device)
        for p, j in zip(part, jobs):
            i = p["i"]
            rel = f"adapters/d{i:05d}.safetensors"
            hp = dict(steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"], optimizer="AdamW", weight_decay=1e-2,
                      rank=p["rank"], alpha=p["alpha"], n_images=p["n_images"], seed=p["seed"],
                      prompt=DB.sks_prompt(p["leaf"]), targets="to_q,to_v of attn1+attn2", base=DB.BASE_NAME,
                      image_seed=p["seed"],
                      **{k: round(v, 5) for k, v in j.result.items() if k.startswith(("eval_", "seconds"))})
            meta = {"lorasearch.suite": "diffusion", "lorasearch.base": DB.BASE_NAME, "lorasearch.leaf": p["leaf"].name,
                    "ss_tag_frequency": json.dumps({"sks": p["n_images"]})}
            _write(adapter_of(ml, jobs.index(j)), out / rel, p["fmt"], meta)
            rows.append(dict(id=f"diffusion-{i:05d}", path=rel, suite="diffusion", label=p["leaf"].superclass,
                             superclass=p["leaf"].superclass, leaf=p["leaf"].name, role=p["role"], format=p["fmt"],
                             rank=p["rank"], alpha=p["alpha"], hyperparameters=hp,
                             loss_curve=j.result["loss_curve"], test_loss=j.result.get("eval_heldout_after")))
        done = c0 + len(part)
        log(f"diffusion: {done}/{n} adapters, {time.time() - t0:.0f}s wall, {time.process_time() - cpu0:.0f}s CPU")
        # rewritten after every chunk, so an interrupted run leaves a valid (smaller) collection
        path = write_manifest(rows, out)
        (out / "collection.json").write_text(json.dumps(dict(
            suite="diffusion", n=len(rows), n_planned=n, seed=seed, device=device, tiny=tiny, base=DB.BASE_NAME,
            **cfg, wall_seconds=round(time.time() - t0, 1),
            process_cpu_seconds=round(time.process_time() - cpu0, 1)), indent=1))
    return path


# ---------------------------------------------------------------------------------------------- evidence
def sample_grid(out_png: str, n_adapters: int = 6, seed: int = 0, steps: int | None = None,
                device: str = "cpu", samples: int = 4, sample_steps: int = 25, guidance: float = 3.0) -> dict:
    """Train a few adapters (one per superclass) and draw: training images | base samples for the
    adapter's prompt ("a photo of sks SUPERCLASS") | the adapter's samples for the same prompt and
    noise. Returns the adapters' eval losses."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = dict(DEFAULTS)
    todo = [p for p in plan(10 * n_adapters, seed) if p["rank"] == 1][:n_adapters * 3]
    picked, seen = [], set()
    for p in todo:   # one per superclass
        if p["leaf"].superclass not in seen:
            picked.append(p)
            seen.add(p["leaf"].superclass)
        if len(picked) == n_adapters:
            break
    base = DB.load_base(device=device)
    jobs = [_job(p, cfg["lr"]) for p in picked]
    ml = train_jobs(copy.deepcopy(base), jobs, steps=steps or cfg["steps"], batch=cfg["batch"], device=device)
    prompts = DB.embed_prompts([DB.sks_prompt(j.leaf) for j in jobs])
    cond = prompts.repeat_interleave(samples, 0)
    route = torch.arange(len(jobs)).repeat_interleave(samples).to(device)
    lora_imgs = DB.sample(routed(ml, route), cond, steps=sample_steps, guidance=guidance, seed=seed, device=device)
    base_imgs = DB.sample(base, cond, steps=sample_steps, guidance=guidance, seed=seed, device=device)
    fig, axes = plt.subplots(len(jobs), 2 * samples + 3, figsize=(1.1 * (2 * samples + 3), 1.25 * len(jobs)))
    for r, j in enumerate(jobs):
        row = [j.images[0], j.images[1 % len(j.images)], None] + list(base_imgs[r * samples:(r + 1) * samples]) \
            + list(lora_imgs[r * samples:(r + 1) * samples])
        for c, im in enumerate(row):
            ax = axes[r, c]
            ax.axis("off")
            if im is not None:
                ax.imshow(im, interpolation="nearest")
        axes[r, 0].set_title(j.leaf.name, fontsize=6, loc="left")
    axes[0, 3].set_title("base: 'a photo of sks SUPERCLASS'", fontsize=6, loc="left")
    axes[0, 3 + samples].set_title("with the leaf's LoRA (same prompt, same noise)", fontsize=6, loc="left")
    fig.suptitle("Diffusion suite: training images | base | LoRA (rank 1, to_q/to_v)", fontsize=8)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return {j.leaf.name: j.result for j in jobs}


def main(argv=None) -> None:
    """``python -m lorasearch.data.diffusion {pretrain,grid,make}``: regenerate the committed base,
    the sample grid, or a collection with non-default training settings (the CLI uses defaults)."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m lorasearch.data.diffusion")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain")
    p.add_argument("--out", default=str(DB.BASE_DIR))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--resume", action="store_true")
    g = sub.add_parser("grid")
    g.add_argument("--out", default="eval/samples_diffusion.png")
    g.add_argument("--steps", type=int, default=None)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--n", type=int, required=True)
    m.add_argument("--steps", type=int, default=None)
    m.add_argument("--batch", type=int, default=None)
    m.add_argument("--lr", type=float, default=None)
    m.add_argument("--chunk", type=int, default=None)
    for q in (p, g, m):
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="cpu")
        q.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.cmd == "pretrain":
        DB.pretrain(a.out, steps=a.steps, minutes=a.minutes, lr=a.lr, seed=a.seed, device=a.device, resume=a.resume)
    elif a.cmd == "grid":
        print(json.dumps(sample_grid(a.out, seed=a.seed, steps=a.steps, device=a.device), indent=1))
    else:
        print(make_collection(a.out, a.n, a.seed, a.device, False, steps=a.steps, batch=a.batch, lr=a.lr,
                              chunk=a.chunk))


if __name__ == "__main__":
    main()
