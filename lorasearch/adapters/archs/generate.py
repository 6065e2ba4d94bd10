"""Regenerate the architecture tables (``*.json`` beside this file).

Run once by a developer (``python -m lorasearch.adapters.archs.generate``); it needs diffusers and
transformers, the reader never does. The base models are built from their published configs on the
``meta`` device (no weights, no download) and every module a LoRA trainer targets is listed with its
weight shape. Which modules count follows kohya sd-scripts / PEFT practice:

* UNet "attention" targets: every Linear, and every 1x1 Conv2d, inside a ``Transformer2DModel``
  (proj_in/proj_out, attn1/attn2 q/k/v/out, ff.net.0.proj, ff.net.2) -> SD1.5 192, SDXL 722.
* UNet "conv" targets (LoCon / ``conv_dim``): Linear and Conv2d inside ResnetBlock2D,
  Downsample2D and Upsample2D.
* CLIP text encoder: self_attn q/k/v/out_proj and mlp fc1/fc2 -> 72 for CLIP-L, 192 for bigG.
* BERT (all-MiniLM-L6-v2): query/key/value, attention.output.dense, intermediate.dense, output.dense.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).parent

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
SD2_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                use_linear_projection=True, sample_size=96)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
    attention_head_dim=[5, 10, 20], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768)
CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              projection_dim=1024, hidden_act="gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")


def _shape(mod) -> list[int]:
    return [int(s) for s in mod.weight.shape]


def unet_modules(config: dict, prefix: str = "unet") -> tuple[list, list]:
    from diffusers import UNet2DConditionModel
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    attn, conv = [], []
    for pname, parent in unet.named_modules():
        if isinstance(parent, Transformer2DModel):
            dest, ok = attn, lambda m: isinstance(m, torch.nn.Linear) or (
                isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (1, 1))
        elif isinstance(parent, (ResnetBlock2D, Downsample2D, Upsample2D)):
            dest, ok = conv, lambda m: isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        else:
            continue
        for cname, child in parent.named_modules():
            if cname and ok(child):
                dest.append([f"{prefix}.{pname}.{cname}", _shape(child)])
    return attn, conv


def clip_modules(config: dict, prefix: str) -> list:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**config))
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            name = name if name.startswith("text_model.") else "text_model." + name  # checkpoint key layout
            out.append([f"{prefix}.{name}", _shape(mod)])
    return out


def bert_modules(hidden: int, inter: int, layers: int) -> list:
    out = []
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            out.append([p + n, [hidden, hidden]])
        out.append([p + "intermediate.dense", [inter, hidden]])
        out.append([p + "output.dense", [hidden, inter]])
    return out


def main() -> None:
    tables = {}
    a, c = unet_modules(SD15_UNET)
    tables["sd15"] = dict(family="sd1", modules=a + clip_modules(CLIP_L, "text_encoder"), conv=c)
    a, c = unet_modules(SD2_UNET)
    tables["sd2"] = dict(family="sd2", modules=a + clip_modules(CLIP_H, "text_encoder"), conv=c)
    a, c = unet_modules(SDXL_UNET)
    tables["sdxl"] = dict(family="sdxl", modules=a + clip_modules(CLIP_L, "text_encoder")
                          + clip_modules(CLIP_G, "text_encoder_2"), conv=c)
    tables["minilm"] = dict(family="minilm", modules=bert_modules(384, 1536, 6), conv=[])
    for arch, t in tables.items():
        path = HERE / f"{arch}.json"
        # one module per line: compact, yet diffs stay readable
        lines = ",\n".join(json.dumps(m) for m in t["modules"])
        clines = ",\n".join(json.dumps(m) for m in t["conv"])
        path.write_text(f'{{"arch": "{arch}", "family": "{t["family"]}",\n"modules": [\n{lines}\n],\n'
                        f'"conv": [\n{clines}\n]}}\n')
        print(arch, len(t["modules"]), len(t["conv"]), path.stat().st_size)


if __name__ == "__main__":
    main()
