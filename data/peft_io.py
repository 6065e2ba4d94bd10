"""Write LoRA factors as real PEFT adapters (folder or bare ``.safetensors`` file).

The config is produced by peft's own ``LoraConfig`` so a folder written here loads with
``PeftModel.from_pretrained``; only the weights are written by hand (fp16 by default, to keep
collections small), with deterministic bytes: sorted keys, sorted ``target_modules``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def peft_key(module: str, half: str) -> str:
    """``encoder.layer.0.attention.self.query`` + ``A`` -> the key PEFT saves."""
    return f"base_model.model.{module}.lora_{half}.weight"


def lora_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """``{module: (A [r,in], B [out,r])}`` -> PEFT-keyed tensors in ``dtype``."""
    dt = DTYPES[dtype]
    out = {}
    for name in sorted(factors):
        A, B = factors[name]
        out[peft_key(name, "A")] = A.detach().to("cpu", dt).contiguous()
        out[peft_key(name, "B")] = B.detach().to("cpu", dt).contiguous()
    return out


def peft_config(r: int, alpha: float, target_modules, dropout: float = 0.0,
                base: str = MINILM_ID, alpha_pattern: dict | None = None,
                rank_pattern: dict | None = None) -> dict:
    """The ``adapter_config.json`` dict peft itself would write for these settings."""
    from peft import LoraConfig

    cfg = LoraConfig(r=int(r), lora_alpha=alpha, target_modules=sorted(target_modules),
                     lora_dropout=float(dropout), base_model_name_or_path=base,
                     alpha_pattern=alpha_pattern or {}, rank_pattern=rank_pattern or {})
    d = cfg.to_dict()
    d["target_modules"] = sorted(d["target_modules"])
    d["inference_mode"] = True
    return json.loads(json.dumps(d, default=list))


def save_peft_folder(path, factors, r: int, alpha: float, target_modules, dropout: float = 0.0,
                     dtype: str = "fp16", base: str = MINILM_ID,
                     alpha_pattern: dict | None = None, rank_pattern: dict | None = None) -> Path:
    """Write ``path/adapter_config.json`` + ``path/adapter_model.safetensors``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = peft_config(r, alpha, target_modules, dropout, base, alpha_pattern, rank_pattern)
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(lora_tensors(factors, dtype), os.fspath(path / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return path


def save_peft_file(path, factors, dtype: str = "fp16") -> Path:
    """A bare PEFT-keyed ``.safetensors`` file. It has no config, so readers take alpha = r:
    fold the scale into B before calling this (``scale_into_b``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors(factors, dtype), os.fspath(path), metadata={"format": "pt"})
    return path


def scale_into_b(factors, scale: float):
    """Same ΔW with alpha = r: B ← scale·B."""
    return {k: (A, B * scale) for k, (A, B) in factors.items()}
