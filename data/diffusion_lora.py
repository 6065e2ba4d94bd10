"""DreamBooth-style LoRA training of many adapters at once on the tiny diffusion base.

Each adapter gets 4–15 images of one leaf and the prompt "a photo of sks SUPERCLASS" (LoRA-WS,
no prior preservation), LoRA on ``to_q``/``to_v`` of every attention block (self ``attn1`` and
cross ``attn2``). All adapters of a chunk are trained together with ``lorasearch.data.multilora``
(factors stacked, every sample routed to its own adapter, per-adapter AdamW); each adapter draws
its images, noise and timesteps from its own generator, so its run does not depend on which other
adapters share the chunk (tested against training it alone).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lorasearch.data import diffusion_base as DB
from lorasearch.data import images as I
from lorasearch.data.multilora import MultiLora, StackedAdamW, per_adapter_mean

TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_v")
EVAL_TIMESTEPS = (100, 300, 500, 700)   # fixed grid: eval losses are deterministic


def is_target(name: str, module) -> bool:
    return name.endswith(TARGETS)


@dataclass
class Job:
    """One adapter to train: which leaf, its images, and its hyperparameters."""

    leaf: I.Leaf
    images: np.ndarray            # [k, 32, 32, 3] in [0, 1], 4–15 of them
    seed: int
    rank: int = 1
    alpha: float = 1.0
    lr: float = 2e-3
    heldout: np.ndarray | None = None   # fresh images of the same leaf (test loss)
    sibling: np.ndarray | None = None   # images of another leaf of the same superclass
    result: dict = field(default_factory=dict)


def _eval_loss(ml: MultiLora, x0: torch.Tensor, cond: torch.Tensor, route: torch.Tensor, n: int,
               sched, device: str) -> np.ndarray:
    """Per-adapter DDPM loss over a fixed timestep grid and fixed noise → ``[n]``."""
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(len(EVAL_TIMESTEPS), *x0.shape, generator=g).to(device)
    out = torch.zeros(n, device=device)
    with torch.no_grad():
        for k, t in enumerate(EVAL_TIMESTEPS):
            tt = torch.full((x0.shape[0],), t, device=device, dtype=torch.long)
            pred = ml(sched.add_noise(x0, noise[k], tt), tt, encoder_hidden_states=cond, route=route).sample
            per = (pred - DB.target(sched, x0, noise[k], tt)).pow(2).flatten(1).mean(1)
            out += per_adapter_mean(per, route, n)
    return (out / len(EVAL_TIMESTEPS)).cpu().numpy()


def _stack(jobs: list[Job], attr: str, device: str):
    xs, route = [], []
    for i, j in enumerate(jobs):
        imgs = getattr(j, attr)
        if imgs is None:
            continue
        xs.append(DB.to_model_space(imgs))
        route += [i] * len(imgs)
    if not xs:
        return None, None
    return torch.cat(xs).to(device), torch.tensor(route, device=device)


def train_jobs(unet, jobs: list[Job], steps: int = 200, batch: int = 4, device: str = "cpu",
               log_every: int = 10, weight_decay: float = 1e-2) -> MultiLora:
    """Train ``jobs`` together on a frozen ``unet``; fills ``job.result`` (loss curve, eval losses).

    Returns the ``MultiLora`` holding the trained factors (adapter i = jobs[i]). The base UNet is
    modified in place (its target Linears are wrapped); pass a fresh copy per chunk.
    """
    n = len(jobs)
    ml = MultiLora(unet, n=n, ranks=[j.rank for j in jobs], alphas=[j.alpha for j in jobs],
                   target=is_target, seeds=[j.seed for j in jobs]).to(device)
    sched = DB.scheduler()
    prompts = DB.embed_prompts([DB.sks_prompt(j.leaf) for j in jobs]).to(device)   # [n, L, 384]
    data = [DB.to_model_space(j.images).to(device) for j in jobs]
    gens = [torch.Generator().manual_seed(int(j.seed) + 1) for j in jobs]
    route = torch.arange(n, device=device).repeat_interleave(batch)
    cond = prompts[route]

    # eval before training: B = 0, so this is the base model's loss on the same samples
    ev = {}
    for attr in ("images", "heldout", "sibling"):
        x0, r = _stack(jobs, attr, device)
        if x0 is not None:
            ev[attr] = (x0, r)
            ev[attr + "_before"] = _eval_loss(ml, x0, prompts[r], r, n, sched, device)

    opt = StackedAdamW(ml.lora_parameters(), lr=[j.lr for j in jobs], weight_decay=weight_decay)
    curves = np.zeros((n, steps), dtype=np.float32)
    ml.train()
    t0 = time.time()
    for step in range(steps):
        xs, noises, ts = [], [], []
        for i, g in enumerate(gens):   # every draw from the adapter's own generator
            idx = torch.randint(0, len(data[i]), (batch,), generator=g)
            xs.append(data[i][idx.to(device)])
            noises.append(torch.randn(batch, *data[i].shape[1:], generator=g))
            ts.append(torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g))
        x0 = torch.cat(xs)
        noise = torch.cat(noises).to(device)
        t = torch.cat(ts).to(device)
        pred = ml(sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond, route=route).sample
        per = per_adapter_mean((pred - DB.target(sched, x0, noise, t)).pow(2).flatten(1).mean(1), route, n)
        opt.zero_grad()
        per.sum().backward()
        opt.step()
        curves[:, step] = per.detach().cpu().numpy()
    seconds = time.time() - t0
    ml.eval()
    for attr in ("images", "heldout", "sibling"):
        if attr in ev:
            x0, r = ev[attr]
            ev[attr + "_after"] = _eval_loss(ml, x0, prompts[r], r, n, sched, device)
    for i, j in enumerate(jobs):
        c = curves[i]
        k = max(1, log_every)
        j.result = dict(
            loss_curve=[float(v) for v in c[: len(c) // k * k].reshape(-1, k).mean(1)] if len(c) >= k else [float(v) for v in c],
            final_loss=float(c[-k:].mean()),
            seconds_per_adapter=seconds / n,
            **{f"eval_{key}": float(v[i]) for key, v in ev.items() if key.endswith(("_before", "_after"))},
        )
    return ml


def routed(ml: MultiLora, route: torch.Tensor):
    """A callable with the UNet's signature that runs ``ml`` with a fixed route (for sampling)."""
    class _R:
        config = ml.base.config

        def __call__(self, *a, **k):
            return ml(*a, route=route, **k)
    return _R()
