"""Every naming scheme, written with real SD1.5 / SDXL / MiniLM module names and shapes, reloads to the
same ΔW under the same normalized names; PEFT alpha_pattern / rank_pattern / rsLoRA / adapter names;
kohya SGM numbering; LoCon Tucker folding. Cross-checks against diffusers/PEFT: test_adapters_libraries.py."""
from __future__ import annotations

import json
import math
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorasearch.adapters import (FORMATS, adapter_delta_error, delta_weight, load_adapter, module_specs,
                                 random_adapter, write_adapter)
from lorasearch.adapters.names import kohya_name

torch.set_num_threads(1)

# a real subset of SDXL: every block kind, SGM numbering up/down/mid, both text encoders
SDXL_SUBSET = (r"(down_blocks\.2\.attentions\.1\.transformer_blocks\.9\.|mid_block\.attentions\.0\.proj_in|"
               r"up_blocks\.0\.attentions\.2\.transformer_blocks\.[04]\.attn2|up_blocks\.1\.attentions\.0\.proj_out|"
               r"text_encoder\.text_model\.encoder\.layers\.11\.|text_encoder_2\.text_model\.encoder\.layers\.31\.)")


def _ext(fmt):
    return "" if fmt == "peft" else ".safetensors"


def test_module_tables_match_the_real_models():
    sd15 = module_specs("sd15")
    assert len(sd15) == 264
    assert sum(n.startswith("unet.") for n, _ in sd15) == 192
    d = dict(sd15)
    assert d["unet.down_blocks.0.attentions.0.proj_in"] == (320, 320, 1, 1)          # 1x1 conv in SD1.5
    assert d["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == (320, 768)
    assert d["unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"] == (10240, 1280)
    assert d["text_encoder.text_model.encoder.layers.11.mlp.fc1"] == (3072, 768)
    sdxl = dict(module_specs("sdxl"))
    assert len(sdxl) == 722 + 72 + 192
    assert sdxl["unet.mid_block.attentions.0.transformer_blocks.9.attn2.to_v"] == (1280, 2048)
    assert sdxl["unet.down_blocks.1.attentions.0.proj_in"] == (640, 640)               # Linear in SDXL
    assert sdxl["text_encoder_2.text_model.encoder.layers.31.mlp.fc2"] == (1280, 5120)
    minilm = dict(module_specs("minilm"))
    assert len(minilm) == 36 and minilm["encoder.layer.5.intermediate.dense"] == (1536, 384)
    assert any(len(s) == 4 and s[2:] == (3, 3) for _, s in module_specs("sd15", conv=True))


@pytest.mark.parametrize("fmt", FORMATS)
def test_sd15_every_format_round_trips(tmp_path, fmt):
    targets = r"(attn[12]\.to_|self_attn)" if fmt == "diffusers-old" else None
    ad = random_adapter("sd15", rank=4, alpha=2.0, dtype="float16", targets=targets, seed=3)
    back = load_adapter(write_adapter(ad, tmp_path / f"a{_ext(fmt)}", fmt))
    assert back.family == "sd1"
    assert [m.name for m in back.modules] == [m.name for m in ad.modules]
    # formats without an alpha fold the scale into B (rounded once to fp16); the others are exact
    assert adapter_delta_error(ad, back) < (2e-3 if fmt in ("peft-file", "diffusers-mid", "diffusers-old") else 1e-7)
    conv = back.module("unet.down_blocks.0.attentions.0.proj_in")
    if conv is not None:
        assert conv.shape == (320, 320, 1, 1) and conv.A.shape == (4, 320)
    assert all(m.dtype == "F16" for m in back.modules)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sdxl_every_format_round_trips(tmp_path, fmt):
    targets = SDXL_SUBSET if fmt != "diffusers-old" else r"(attn2\.to_|layers\.3\.self_attn)"
    ad = random_adapter("sdxl", rank=2, alpha=2.0, dtype="bfloat16", targets=targets, seed=4)
    back = load_adapter(write_adapter(ad, tmp_path / f"a{_ext(fmt)}", fmt, dtype="BF16"))
    assert back.family == "sdxl"
    assert adapter_delta_error(ad, back) < 1e-7      # alpha = rank: nothing to fold, bf16 is exact
    assert all(m.dtype == "BF16" for m in back.modules)


@pytest.mark.parametrize("fmt", ["peft", "peft-file", "diffusers"])
def test_minilm_formats_round_trip(tmp_path, fmt):
    ad = random_adapter("minilm", rank=8, alpha=16, seed=5)
    back = load_adapter(write_adapter(ad, tmp_path / f"a{_ext(fmt)}", fmt, dtype="F32"))
    assert back.family == "minilm"
    assert back.module("encoder.layer.0.attention.self.query") is not None
    assert adapter_delta_error(ad, back) < 1e-6


def test_sdxl_kohya_uses_sgm_numbering_and_te1_te2(tmp_path):
    ad = random_adapter("sdxl", rank=1, seed=1, conv=True,
                        targets=r"(blocks\.\d\.(resnets|attentions|downsamplers|upsamplers)\.[01]\.(?!transformer_blocks\.[1-8]\.)"
                                r"|mid_block|layers\.31\.)")
    p = write_adapter(ad, tmp_path / "x.safetensors", "kohya")
    back = load_adapter(p)
    keys = set(safe_open(str(p), "np").keys())
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2.alpha" in keys
    assert "lora_unet_input_blocks_3_0_op.lora_down.weight" in keys                # downsampler
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in keys               # upsampler
    assert any(k.startswith("lora_te2_text_model_encoder_layers_31_") for k in keys)
    assert back.family == "sdxl" and len(back.modules) == len(ad.modules) > 250
    assert adapter_delta_error(ad, back) < 2e-3
    assert back.warnings == []


def test_peft_alpha_pattern_rank_pattern_and_rslora(tmp_path):
    ad = random_adapter("minilm", rank=8, alpha=16, seed=2)
    # give one module another rank and another alpha: the writer emits rank_pattern / alpha_pattern
    m = ad.modules[0]
    rng = np.random.default_rng(0)
    m.A, m.B = rng.standard_normal((4, m.A.shape[1])).astype(np.float32), m.B[:, :4].copy()
    m.scale, m.alpha = 3.0 / 4, 3.0
    p = write_adapter(ad, tmp_path / "peft", "peft", dtype="F32")
    cfg = json.loads((p / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["rank_pattern"] == {m.name: 4} and cfg["alpha_pattern"] == {m.name: 3.0}
    back = load_adapter(p)
    assert back.module(m.name).scale == pytest.approx(0.75) and back.module(m.name).rank == 4
    assert adapter_delta_error(ad, back) < 1e-6

    # rsLoRA: scale = lora_alpha / sqrt(r); the writer stores lora_alpha so that ΔW is unchanged
    p2 = write_adapter(ad, tmp_path / "rs", "peft", dtype="F32", config_extra={"use_rslora": True})
    cfg2 = json.loads((p2 / "adapter_config.json").read_text())
    assert cfg2["use_rslora"] and cfg2["lora_alpha"] == pytest.approx(2.0 * math.sqrt(8))
    assert adapter_delta_error(ad, load_adapter(p2)) < 1e-6

    # a pattern that matches by suffix, PEFT's (.*\.)?(pattern)$ rule: every value projection alpha 32
    p3 = write_adapter(ad, tmp_path / "pat", "peft", dtype="F32",
                       config_extra={"alpha_pattern": {"attention.self.value": 32}, "rank_pattern": {}})
    back3 = load_adapter(p3)
    assert back3.module("encoder.layer.3.attention.self.value").scale == pytest.approx(4.0)
    assert back3.module("encoder.layer.3.attention.self.query").scale == pytest.approx(2.0)


def test_peft_adapter_name_left_in_keys_and_diffusers_alpha_metadata(tmp_path):
    ad = random_adapter("sd15", rank=4, alpha=1, seed=9, targets=r"attn1\.to_q")
    p = write_adapter(ad, tmp_path / "named", "peft", adapter_name="default", dtype="F32")
    back = load_adapter(p)
    assert adapter_delta_error(ad, back) < 1e-6 and back.modules[0].scale == 0.25
    q = write_adapter(ad, tmp_path / "d.safetensors", "diffusers", dtype="F32")
    back = load_adapter(q)
    meta = json.loads(back.metadata["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 1.0 and meta["unet.r"] == 4
    assert adapter_delta_error(ad, back) < 1e-6


def test_locon_tucker_mid_is_folded_exactly(tmp_path):
    rng = np.random.default_rng(1)
    r, cin, cout = 4, 320, 640
    down = rng.standard_normal((r, cin, 1, 1)).astype(np.float32)
    mid = rng.standard_normal((r, r, 3, 3)).astype(np.float32)
    up = rng.standard_normal((cout, r, 1, 1)).astype(np.float32)
    key = kohya_name("unet.down_blocks.1.resnets.0.conv1")
    p = tmp_path / "locon.safetensors"
    save_file({f"{key}.lora_down.weight": torch.from_numpy(down), f"{key}.lora_mid.weight": torch.from_numpy(mid),
               f"{key}.lora_up.weight": torch.from_numpy(up), f"{key}.alpha": torch.tensor(2.0)}, str(p))
    m = load_adapter(p).modules[0]
    assert m.name == "unet.down_blocks.1.resnets.0.conv1" and m.shape == (cout, cin, 3, 3)
    ref = 0.5 * np.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    np.testing.assert_allclose(delta_weight(m), ref, rtol=1e-4, atol=1e-5)


def test_wrappers_and_llm_names_normalize(tmp_path):
    rng = np.random.default_rng(0)
    t = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    p = tmp_path / "llm.safetensors"
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": t(2, 64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": t(64, 2),
               "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": t(2, 172),
               "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight": t(64, 2)}, str(p))
    ad = load_adapter(p)
    assert [m.name for m in ad.modules] == ["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"]
    assert ad.family == "llama-h64" and ad.format == "peft-file"
    q = tmp_path / "bert.safetensors"
    save_file({"base_model.model.bert.encoder.layer.2.attention.self.value.lora_A.weight": t(2, 384),
               "base_model.model.bert.encoder.layer.2.attention.self.value.lora_B.weight": t(384, 2)}, str(q))
    assert load_adapter(q).modules[0].name == "encoder.layer.2.attention.self.value"


def test_unknown_kohya_names_fall_back_to_heuristic_with_warning(tmp_path):
    rng = np.random.default_rng(0)
    t = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    p = tmp_path / "lumina.safetensors"       # a DiT no table covers (Lumina 2, kohya names)
    save_file({"lora_unet_layers_0_attention_qkv.lora_down.weight": t(2, 2304),
               "lora_unet_layers_0_attention_qkv.lora_up.weight": t(6912, 2),
               "lora_unet_layers_0_attention_qkv.alpha": torch.tensor(1.0)}, str(p))
    ad = load_adapter(p)
    assert ad.modules[0].name == "unet.layers.0.attention.qkv" and ad.modules[0].scale == 0.5
    assert any("heuristic" in w for w in ad.warnings)
