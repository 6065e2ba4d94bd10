"""Flux.1 and SD3: one module naming for every DiT LoRA layout, so converted copies compare as the same update.

Flux LoRAs come with two namings of the same weights (research notes §2.1, §5):

* fused, BFL names — kohya/Civitai ``lora_unet_double_blocks_0_img_attn_qkv``, ComfyUI/BFL-native
  ``diffusion_model.double_blocks.0.img_attn.qkv``, fal ``base_model.model.double_blocks…``, XLabs
  ``double_blocks.0.processor.qkv_lora1``: one module for q, k and v (B ``[9216, r]``) and, in single
  blocks, ``linear1`` = q, k, v and the MLP input (B ``[21504, r]``);
* split, diffusers names — ai-toolkit / SimpleTuner / diffusers ``transformer.transformer_blocks.0.attn.to_q``.

We map everything to the diffusers names (the table below is the one diffusers'
``_convert_kohya_flux_lora_to_diffusers`` and sd-scripts' ``convert_flux_lora.py`` use). A fused module
``ΔW = s·B·A`` with B cut by rows into ``B_q, B_k, B_v…`` gives ``ΔW_q = s·B_q·A``: sharing A is exact, no
approximation. Columns of a part's B that are all zero are dropped with their rows of A (also exact); this
undoes the block-diagonal B of kohya ``split_qkv`` files and of diffusers→kohya conversions, and the scale
is kept as stored (kohya-ss/sd-scripts#2204: such files may be meant at ``alpha/(r/3)``; we warn).
SD3/3.5 kohya files (SAI names ``joint_blocks.N.x_block.attn.qkv``) are mapped the same way to diffusers'
``transformer_blocks.N.attn.to_q`` …; AdaLN rows that diffusers stores as (scale, shift) are swapped.
Modules of other widths (Flux.2, Klein) keep their fused names, with a warning.
"""
from __future__ import annotations

import re

import numpy as np

from ..errors import BadAdapterError
from ..types import LoraModule
from .safetensors_strict import short

H = 3072                      # Flux.1 hidden size; MLP 4·H
_DOUBLE = {
    "img_attn.qkv": (("attn.to_q", H), ("attn.to_k", H), ("attn.to_v", H)),
    "img_attn.proj": (("attn.to_out.0", None),),
    "img_mlp.0": (("ff.net.0.proj", None),),
    "img_mlp.2": (("ff.net.2", None),),
    "img_mod.lin": (("norm1.linear", None),),
    "txt_attn.qkv": (("attn.add_q_proj", H), ("attn.add_k_proj", H), ("attn.add_v_proj", H)),
    "txt_attn.proj": (("attn.to_add_out", None),),
    "txt_mlp.0": (("ff_context.net.0.proj", None),),
    "txt_mlp.2": (("ff_context.net.2", None),),
    "txt_mod.lin": (("norm1_context.linear", None),),
}
_SINGLE = {
    "linear1": (("attn.to_q", H), ("attn.to_k", H), ("attn.to_v", H), ("proj_mlp", 4 * H)),
    "xlabs_qkv": (("attn.to_q", H), ("attn.to_k", H), ("attn.to_v", H)),   # XLabs qkv_lora = linear1 rows 0:9216
    "linear2": (("proj_out", None),),
    "xlabs_proj": (("proj_out", None),),                                      # XLabs proj_lora: 15360 → 3072
    "modulation.lin": (("norm.linear", None),),
}
_XLABS = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
          "proj_lora2": "txt_attn.proj", "qkv_lora": "xlabs_qkv", "proj_lora": "xlabs_proj"}
# the embedders and the final layer (kohya ``train_blocks``/``in_dims``, BFL-native files); diffusers stores
# the final adaLN modulation as (scale, shift) where BFL has (shift, scale): swap B's row halves
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
KOHYA_TOP = {k.replace(".", "_"): k for k in _TOP}
_BFL = re.compile(r"^transformer\.(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_XLABS_RX = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)$")


def xlabs_to_bfl(stem: str) -> str | None:
    """``double_blocks.0.processor.qkv_lora1`` → ``transformer.double_blocks.0.img_attn.qkv`` (None: not XLabs)."""
    m = _XLABS_RX.match(stem)
    if not m or m.group(3) not in _XLABS:
        return None
    return f"transformer.{m.group(1)}.{m.group(2)}.{_XLABS[m.group(3)]}"


_THIRDS = (("to_q", 3), ("to_k", 3), ("to_v", 3))
# SD3 / SD3.5 (kohya ``lora_unet_joint_blocks_…``, SAI names) → diffusers ``transformer_blocks``; a part size
# given as (name, 3) is a third of the fused output (hidden 1536 for SD3/3.5 Medium, 2432 for 3.5 Large)
_SD3 = {
    "x_block.attn.qkv": tuple((f"attn.{n}", k) for n, k in _THIRDS), "x_block.attn.proj": (("attn.to_out.0", None),),
    "x_block.attn2.qkv": tuple((f"attn2.{n}", k) for n, k in _THIRDS),
    "x_block.attn2.proj": (("attn2.to_out.0", None),),
    "x_block.mlp.fc1": (("ff.net.0.proj", None),), "x_block.mlp.fc2": (("ff.net.2", None),),
    "x_block.adaLN_modulation.1": (("norm1.linear", None),),
    "context_block.attn.qkv": (("attn.add_q_proj", 3), ("attn.add_k_proj", 3), ("attn.add_v_proj", 3)),
    "context_block.attn.proj": (("attn.to_add_out", None),),
    "context_block.mlp.fc1": (("ff_context.net.0.proj", None),), "context_block.mlp.fc2": (("ff_context.net.2", None),),
    "context_block.adaLN_modulation.1": (("norm1_context.linear", None),),
}
_JOINT = re.compile(r"^transformer\.joint_blocks\.(\d+)\.(.+)$")


def _swap_halves(m: LoraModule, name: str) -> LoraModule:
    """diffusers keeps (scale, shift) where BFL/SAI keep (shift, scale): swap B's row halves (exact)."""
    half = m.B.shape[0] // 2
    B = np.concatenate([m.B[half:], m.B[:half]])
    return LoraModule(name=name, A=m.A, B=B, scale=m.scale, dtype=m.dtype, shape=m.shape, alpha=m.alpha)


def _emit(m: LoraModule, base: str, parts, out: list, trimmed: list) -> None:
    """Cut ``m`` by rows of B into ``parts`` [(suffix, rows | None = all | 3 = a third)]; A is shared (exact)."""
    row = 0
    for suffix, n in parts:
        n = m.out_features if n is None else (m.out_features // 3 if n == 3 else n)
        B, A = m.B[row:row + n], m.A
        row += n
        if len(parts) > 1:
            used = np.flatnonzero(np.any(B != 0, axis=0))
            if 0 < used.size < B.shape[1]:        # block-diagonal B: keep this part's own columns only
                B, A = B[:, used], A[used]
                trimmed.append(m.name)
        alpha = None if m.alpha is None else m.scale * A.shape[0]
        out.append(LoraModule(name=base + suffix, A=np.ascontiguousarray(A), B=np.ascontiguousarray(B),
                              scale=m.scale, dtype=m.dtype, shape=(n, m.shape[1]), alpha=alpha))


def _fits(parts, m: LoraModule) -> bool:
    fixed = [n for _, n in parts if n not in (None, 3)]
    if fixed:
        return sum(fixed) == m.out_features
    return not any(n == 3 for _, n in parts) or m.out_features % 3 == 0


def split_fused(path, modules: list[LoraModule], warnings: list[str]) -> list[LoraModule]:
    """Rename BFL-named Flux modules and SAI-named SD3 modules to diffusers names, splitting fused ones
    exactly (see module doc). Called for adapters of family ``flux``, ``sd3`` and ``sd3.5-large``."""
    out: list[LoraModule] = []
    unknown, trimmed = [], []
    for m in modules:
        hit = None
        top = m.name[len("transformer."):] if m.name.startswith("transformer.") else None
        if top in _TOP and len(m.shape) == 2:
            if top == "final_layer.adaLN_modulation.1" and m.out_features % 2 == 0:
                out.append(_swap_halves(m, "transformer." + _TOP[top]))
            else:
                out.append(LoraModule(name="transformer." + _TOP[top], A=m.A, B=m.B, scale=m.scale,
                                      dtype=m.dtype, shape=m.shape, alpha=m.alpha))
            continue
        joint = _JOINT.match(m.name)
        if joint:
            parts = _SD3.get(joint.group(2))
            base = f"transformer.transformer_blocks.{joint.group(1)}."
            if parts and joint.group(2) == "context_block.adaLN_modulation.1" and m.out_features == 2 * m.in_features:
                out.append(_swap_halves(m, base + parts[0][0]))     # the last block's pre-only context norm
                continue
        else:
            hit = _BFL.match(m.name)
            table = (_DOUBLE if hit and hit.group(1) == "double_blocks" else _SINGLE) if hit else None
            parts = table.get(hit.group(3)) if table else None
            if hit:
                block = "transformer_blocks" if hit.group(1) == "double_blocks" else "single_transformer_blocks"
                base = f"transformer.{block}.{hit.group(2)}."
        if parts is None or len(m.shape) != 2 or not _fits(parts, m):
            if joint or hit:
                unknown.append(m.name)     # e.g. Flux.2 / Klein widths: keep the fused module
            out.append(m)
            continue
        _emit(m, base, parts, out, trimmed)
    if unknown:
        warnings.append(f"{len(unknown)} fused DiT modules kept under their original names (no diffusers "
                        f"equivalent for this shape), e.g. {short(unknown[0])}")
    if trimmed:
        warnings.append(f"{len(set(trimmed))} fused modules have a block-diagonal B (kohya split_qkv or a "
                        f"diffusers→kohya conversion), e.g. {short(trimmed[0])}: split exactly; scale kept as "
                        "alpha/(total rank) as ComfyUI applies it (kohya-ss/sd-scripts#2204)")
    out.sort(key=lambda x: x.name)
    names = [x.name for x in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise BadAdapterError(path, f"module {short(dup)} is present both fused and split")
    return out


def known_bfl(name: str) -> bool:
    """A BFL-named Flux module this table maps (so a kohya name restored by heuristic is not a guess)."""
    if name.startswith("transformer.") and name[len("transformer."):] in _TOP:
        return True
    hit = _BFL.match(name)
    if not hit:
        return False
    return hit.group(3) in (_DOUBLE if hit.group(1) == "double_blocks" else _SINGLE)


_DIT = re.compile(r"^transformer\.(single_)?transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|"
                  r"to_add_out)|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear|norm\.linear|proj_mlp|"
                  r"proj_out)$")


def known_dit(name: str) -> bool:
    """A diffusers Flux/SD3 block linear (OneTrainer writes them in kohya grammar: ``lora_transformer_…``)."""
    return _DIT.match(name) is not None
