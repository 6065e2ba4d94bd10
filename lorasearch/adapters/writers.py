"""Writers of real adapter files in every naming scheme the reader accepts.

Tests, benchmarks and the collection factory use these to produce files exactly as the tools in the
wild lay them out (PEFT folders, the three diffusers generations, kohya/Civitai), with the real module
names and shapes of SD1.5, SDXL and all-MiniLM-L6-v2 (``archs/*.json``). Files are written with the
``safetensors`` library and reload to the same ΔW = scale·B·A: formats that carry no alpha get the
scale folded into B, as converters do.

    ad = random_adapter("sd15", rank=8, targets=r"attn2\\.to_[kv]", seed=1)
    write_adapter(ad, "out/my_lora.safetensors", "kohya")
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..types import LoraAdapter, LoraModule
from .names import arch_table, kohya_name, split_component

FORMATS = ("peft", "peft-file", "diffusers", "diffusers-mid", "diffusers-old", "kohya")
_TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_NP_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "F32": "F32", "F16": "F16", "BF16": "BF16"}
_FAMILY = {"sd15": "sd1", "sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "minilm": "minilm"}


def module_specs(arch: str, conv: bool = False) -> list[tuple[str, tuple]]:
    """(normalized module name, weight shape) of every LoRA target of ``arch``
    (``sd15``/``sd1``, ``sd2``, ``sdxl``, ``minilm``); ``conv=True`` adds the UNet resnet/sampler
    convolutions LoCon trains (kohya ``conv_dim``)."""
    arch = "sd15" if arch == "sd1" else arch
    t = arch_table(arch)
    rows = t["modules"] + (t["conv"] if conv else [])
    return [(name, tuple(shape)) for name, shape in rows]


def _select(specs, targets):
    if targets is None:
        return specs
    if isinstance(targets, str):
        rx = re.compile(targets)
        return [s for s in specs if rx.search(s[0])]
    wanted = set(targets)
    return [s for s in specs if s[0] in wanted or any(s[0].endswith("." + t) for t in wanted)]


def quantize(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to what ``dtype`` (F16/BF16/F32) can hold, returned as float32."""
    dtype = _NP_NAMES[dtype]
    if dtype == "F32":
        return x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(_TORCH_DTYPES[dtype]).float().numpy()


def random_adapter(arch: str, rank: int = 8, targets=None, seed: int = 0, alpha: float | None = None,
                   dtype: str = "float32", conv: bool = False, path: str = "") -> LoraAdapter:
    """A LoRA on ``arch`` with random (non-zero) A and B of realistic magnitude.

    targets  None (all), a regex searched in the module name, or a list of names / name suffixes
    alpha    None → alpha = rank (scale 1)
    dtype    values are rounded to this precision (``float16``/``bfloat16``) so that writing them
             in that dtype is lossless
    """
    specs = _select(module_specs(arch, conv=conv), targets)
    if not specs:
        raise ValueError(f"no module of {arch} matches targets={targets!r}")
    rng = np.random.default_rng(seed)
    alpha = float(rank if alpha is None else alpha)
    mods = []
    for name, shape in specs:
        fan_in = int(np.prod(shape[1:]))
        A = rng.standard_normal((rank, fan_in)).astype(np.float32) / np.float32(math.sqrt(fan_in))
        B = rng.standard_normal((shape[0], rank)).astype(np.float32) * np.float32(0.02)
        mods.append(LoraModule(name, quantize(A, dtype), quantize(B, dtype), alpha / rank,
                               _NP_NAMES[dtype], tuple(shape), alpha))
    mods.sort(key=lambda m: m.name)
    return LoraAdapter(path=path, format="memory", sha256="", family=_FAMILY.get(arch, arch), modules=mods)


def delta_weight(m: LoraModule) -> np.ndarray:
    """Dense ΔW = scale·B·A in float64, reshaped to the weight shape (tests/benchmarks only)."""
    d = m.scale * (m.B.astype(np.float64) @ m.A.astype(np.float64))
    return d.reshape(m.shape) if m.shape and int(np.prod(m.shape)) == d.size else d


# ---- tensors ----------------------------------------------------------------------------------
def _factors(m: LoraModule, fold_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """A, B in their stored layout (conv: A [r,in,kh,kw], B [out,r,1,1]); scale folded into B if asked."""
    A, B = m.A, m.B
    if fold_scale and m.scale != 1.0:
        B = B * np.float32(m.scale)
    if len(m.shape) == 4:
        A = A.reshape(m.rank, m.shape[1], m.shape[2], m.shape[3])
        B = B.reshape(m.shape[0], m.rank, 1, 1)
    return A, B


def _t(x: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(_TORCH_DTYPES[dtype]).contiguous()


def _alpha_tensor(alpha: float, dtype: str) -> torch.Tensor:
    """The scalar alpha in the save dtype (as kohya does) unless that would round it."""
    t = torch.tensor(alpha, dtype=_TORCH_DTYPES[dtype])
    return t if float(t) == alpha else torch.tensor(alpha, dtype=torch.float32)


def _alpha_of(m: LoraModule, rslora: bool = False) -> float:
    return float(m.scale * (math.sqrt(m.rank) if rslora else m.rank))


def _peft_config(mods: list[LoraModule], strip: str = "", rslora: bool = False) -> dict:
    """r / lora_alpha as the most common values plus rank_pattern / alpha_pattern for the rest."""
    ranks = Counter(m.rank for m in mods)
    alphas = Counter(_alpha_of(m, rslora) for m in mods)
    r = ranks.most_common(1)[0][0]
    a = alphas.most_common(1)[0][0]
    rel = lambda n: n[len(strip):] if strip and n.startswith(strip) else n  # noqa: E731
    leaves = sorted({m.name.rsplit(".", 1)[-1] for m in mods})
    return {
        "r": r, "lora_alpha": a, "use_rslora": rslora,
        "rank_pattern": {rel(m.name): m.rank for m in mods if m.rank != r},
        "alpha_pattern": {rel(m.name): _alpha_of(m, rslora) for m in mods if _alpha_of(m, rslora) != a},
        "target_modules": leaves,
    }


def write_adapter(adapter: LoraAdapter, path, fmt: str, dtype: str = "F16", metadata: dict | None = None,
                  config_extra: dict | None = None, adapter_name: str | None = None) -> Path:
    """Write ``adapter`` to ``path`` in ``fmt`` (one of :data:`FORMATS`); returns the path written.

    peft           folder: adapter_config.json + adapter_model.safetensors, ``base_model.model.<name>.lora_A.weight``
                   (``adapter_name`` leaves ``.lora_A.<adapter_name>.weight`` in the keys, as some tools do;
                   ``config_extra`` is merged into adapter_config.json, e.g. ``{"use_rslora": True}``)
    peft-file      the bare PEFT-keyed .safetensors (no config; scale folded into B)
    diffusers      ``unet.<path>.lora_A.weight``; alpha in ``lora_adapter_metadata`` when alpha ≠ rank
    diffusers-mid  ``unet.<path>.lora.down.weight``, text encoders ``<path>.lora_linear_layer.down.weight``
    diffusers-old  attn-procs ``<path>.processor.to_q_lora.down.weight`` (attention modules only)
    kohya          ``lora_unet_…``/``lora_te_…`` (SDXL: ``lora_te1_``/``lora_te2_`` and SGM numbering),
                   per-module ``.alpha``, ``ss_*`` metadata
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    dtype = _NP_NAMES[dtype]
    path = Path(path)
    meta = {"format": "pt"}
    cfg_extra = dict(config_extra or {})
    tensors: dict[str, torch.Tensor] = {}
    mods = adapter.modules

    if fmt == "peft":
        rslora = bool(cfg_extra.get("use_rslora", False))
        cfg = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
               "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0, "inference_mode": True,
               "init_lora_weights": True, "modules_to_save": None}
        comps = {split_component(m.name)[0] for m in mods}
        strip = f"{comps.pop()}." if len(comps) == 1 and comps & {"unet", "text_encoder"} else ""
        cfg.update(_peft_config(mods, strip=strip, rslora=rslora))
        cfg.update(cfg_extra)
        mid = f".{adapter_name}" if adapter_name else ""
        for m in mods:
            A, B = _factors(m, fold_scale=False)
            key = _peft_path(m.name, mods)
            tensors[f"base_model.model.{key}.lora_A{mid}.weight"] = _t(A, dtype)
            tensors[f"base_model.model.{key}.lora_B{mid}.weight"] = _t(B, dtype)
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        meta.update(metadata or {})
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata=meta)
        return path

    sdxl = adapter.family == "sdxl" or any(m.name.startswith("text_encoder_2.") for m in mods)
    if fmt == "peft-file":
        for m in mods:
            A, B = _factors(m, fold_scale=True)
            tensors[f"base_model.model.{m.name}.lora_A.weight"] = _t(A, dtype)
            tensors[f"base_model.model.{m.name}.lora_B.weight"] = _t(B, dtype)
    elif fmt == "diffusers":
        rslora = bool(cfg_extra.get("use_rslora", False))
        by_comp: dict[str, list[LoraModule]] = {}
        for m in mods:
            A, B = _factors(m, fold_scale=False)
            tensors[f"{m.name}.lora_A.weight"] = _t(A, dtype)
            tensors[f"{m.name}.lora_B.weight"] = _t(B, dtype)
            by_comp.setdefault(split_component(m.name)[0], []).append(m)
        if cfg_extra or any(_alpha_of(m) != m.rank for m in mods):
            packed = {}
            for comp, cm in by_comp.items():
                cfg = _peft_config(cm, strip=f"{comp}." if comp else "", rslora=rslora)
                cfg.update(cfg_extra)
                packed.update({(f"{comp}.{k}" if comp else k): v for k, v in cfg.items()})
            meta["lora_adapter_metadata"] = json.dumps(packed, sort_keys=True)
    elif fmt == "diffusers-mid":
        for m in mods:
            A, B = _factors(m, fold_scale=True)
            part = "lora" if m.name.startswith("unet.") else "lora_linear_layer"
            tensors[f"{m.name}.{part}.down.weight"] = _t(A, dtype)
            tensors[f"{m.name}.{part}.up.weight"] = _t(B, dtype)
    elif fmt == "diffusers-old":
        for m in mods:
            key = _attn_procs_name(m.name)
            A, B = _factors(m, fold_scale=True)
            tensors[f"{key}.down.weight"] = _t(A, dtype)
            tensors[f"{key}.up.weight"] = _t(B, dtype)
    else:  # kohya
        for m in mods:
            key = kohya_name(m.name, sdxl=sdxl)
            A, B = _factors(m, fold_scale=False)
            tensors[f"{key}.lora_down.weight"] = _t(A, dtype)
            tensors[f"{key}.lora_up.weight"] = _t(B, dtype)
            tensors[f"{key}.alpha"] = _alpha_tensor(_alpha_of(m), dtype)
        ranks = Counter(m.rank for m in mods).most_common(1)[0][0]
        alphas = Counter(_alpha_of(m) for m in mods).most_common(1)[0][0]
        meta.update({
            "ss_network_module": "networks.lora", "ss_network_dim": str(ranks),
            "ss_network_alpha": str(alphas), "ss_network_args": "null",
            "ss_v2": str(adapter.family == "sd2"),
            "ss_base_model_version": {"sdxl": "sdxl_base_v1-0", "sd2": "sd_v2"}.get(adapter.family, "sd_v1"),
            "ss_mixed_precision": {"F16": "fp16", "BF16": "bf16", "F32": "no"}[dtype],
        })
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def _peft_path(name: str, mods: list[LoraModule]) -> str:
    """PEFT wraps one model: a UNet-only (or text-encoder-only) adapter is keyed by the UNet's own
    paths, as ``unet.save_pretrained`` writes it; mixed adapters keep the component prefix."""
    comps = {split_component(m.name)[0] for m in mods}
    comp, path = split_component(name)
    return path if len(comps) == 1 and comp in ("unet", "text_encoder") else name


_OLD_ATTN = re.compile(r"\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)$")
_OLD_TE = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}


def _attn_procs_name(name: str) -> str:
    """Normalized name → the 2023 attn-procs key stem (UNet without prefix; text encoder
    ``self_attn.to_q_lora`` / ``mlp.fc1.lora_linear_layer``)."""
    comp, path = split_component(name)
    if comp == "unet":
        m = _OLD_ATTN.search(path)
        if m:
            proc = "to_out_lora" if m.group(2) == "to_out.0" else f"{m.group(2)}_lora"
            return f"{path[:m.start()]}.{m.group(1)}.processor.{proc}"
    elif comp.startswith("text_encoder"):
        head, _, leaf = path.rpartition(".")
        if leaf in _OLD_TE and head.endswith("self_attn"):
            return f"{comp}.{head}.{_OLD_TE[leaf]}"
        if leaf in ("fc1", "fc2"):
            return f"{name}.lora_linear_layer"
    raise ValueError(f"diffusers-old (attn-procs) format cannot hold module {name!r}; "
                     "it only has UNet attention q/k/v/out and text-encoder layers")


def delta_error(a: LoraModule, b: LoraModule) -> float:
    """Relative Frobenius distance ‖ΔW_a − ΔW_b‖ / ‖ΔW_a‖ computed from the factors, never forming ΔW
    (⟨ΔW₁, ΔW₂⟩ = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ))); tests and benchmarks use it to check round trips."""
    def inner(x: LoraModule, y: LoraModule) -> float:
        bx, by = x.B.astype(np.float64), y.B.astype(np.float64)
        ax, ay = x.A.astype(np.float64), y.A.astype(np.float64)
        return float(x.scale * y.scale * np.trace((bx.T @ by) @ (ay @ ax.T)))
    aa, bb, ab = inner(a, a), inner(b, b), inner(a, b)
    return math.sqrt(max(aa + bb - 2 * ab, 0.0) / aa) if aa > 0 else math.sqrt(max(bb, 0.0))


def adapter_delta_error(a: LoraAdapter, b: LoraAdapter) -> float:
    """Largest :func:`delta_error` over modules; raises AssertionError if the module names differ."""
    na, nb = [m.name for m in a.modules], [m.name for m in b.modules]
    if na != nb:
        diff = sorted(set(na) ^ set(nb))
        raise AssertionError(f"module names differ ({len(diff)}), e.g. {diff[:3]}")
    return max((delta_error(x, y) for x, y in zip(a.modules, b.modules)), default=0.0)
