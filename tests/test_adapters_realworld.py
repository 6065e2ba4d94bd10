"""Real-world layouts, each written with the real module names and shapes of its base model (research notes
§1, §3-5, §8): PEFT adapters of Llama-2/3, Mistral, Qwen2, Gemma, Phi-3, GPT-2; Flux in kohya, BFL-native,
diffusers and XLabs layouts (all read as one naming, converted copies = the same ΔW); SD3, SDXL, SD2;
LoCon + Tucker, DoRA; alpha dtypes, fp8, huge headers, missing metadata."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorasearch.adapters import describe, load_adapter
from lorasearch.adapters.writers import delta_weight
from lorasearch.similarity import relative_difference

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


def _t(*shape, dtype=torch.float32):
    return torch.from_numpy(RNG.standard_normal(shape).astype(np.float32)).to(dtype)


# ---- LLM PEFT adapters ------------------------------------------------------------------------
# (hidden, q out, kv out, intermediate, fused qkv/gate_up like Phi-3)
LLMS = {
    "llama-2-7b": (4096, 4096, 4096, 11008, False),
    "llama-3-8b": (4096, 4096, 1024, 14336, False),
    "mistral-7b": (4096, 4096, 1024, 14336, False),
    "qwen2-0.5b": (896, 896, 128, 4864, False),
    "qwen2-7b": (3584, 3584, 512, 18944, False),
    "gemma-2b": (2048, 2048, 256, 16384, False),
    "phi-3-mini": (3072, 3072, 3072, 8192, True),
}


def _llm_modules(model, targets):
    h, q, kv, inter, fused = LLMS[model]
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    if fused:
        shapes = {"qkv_proj": (q + 2 * kv, h), "o_proj": (h, q), "gate_up_proj": (2 * inter, h),
                  "down_proj": (h, inter)}
    mods = {}
    for layer in (0, 1):
        for t, shape in shapes.items():
            if targets == "all-linear" or t in targets:
                sub = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj") else "mlp"
                mods[f"model.layers.{layer}.{sub}.{t}"] = shape
    return mods


def _peft_folder(path, mods, r, config, adapter_name=None, dtype=torch.bfloat16):
    path.mkdir(parents=True)
    tensors = {}
    for name, (out, inp) in mods.items():
        mid = f".{adapter_name}" if adapter_name else ""
        rr = (config or {}).get("rank_pattern", {}).get(name.rsplit(".", 1)[-1], r)
        tensors[f"base_model.model.{name}.lora_A{mid}.weight"] = _t(rr, inp, dtype=dtype)
        tensors[f"base_model.model.{name}.lora_B{mid}.weight"] = _t(out, rr, dtype=dtype)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.05,
               "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
               "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": "some/base"}
        cfg.update(config)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("model", list(LLMS))
def test_llm_family_depends_on_base_only(tmp_path, model):
    h, fused = LLMS[model][0], LLMS[model][4]
    qv = ["qkv_proj"] if fused else ["q_proj", "v_proj"]
    a = load_adapter(_peft_folder(tmp_path / "qv", _llm_modules(model, qv), 8,
                                  {"target_modules": qv}))
    b = load_adapter(_peft_folder(tmp_path / "all", _llm_modules(model, "all-linear"), 16,
                                  {"target_modules": "all-linear", "lora_alpha": 32}))
    assert a.family == b.family == f"llama-h{h}"
    assert a.format == "peft" and a.modules[0].dtype == "BF16"
    assert {m.scale for m in a.modules} == {2.0} and {m.scale for m in b.modules} == {2.0}
    v = b.module("layers.1.self_attn.qkv_proj" if fused else "layers.1.self_attn.v_proj")
    assert v.shape == (LLMS[model][1] + 2 * LLMS[model][2], h) if fused else v.shape == (LLMS[model][2], h)
    assert not a.warnings and not b.warnings


def test_llm_families_differ_by_hidden_size(tmp_path):
    fams = {load_adapter(_peft_folder(tmp_path / m, _llm_modules(m, ["o_proj"]), 4, {})).family
            for m in ("llama-3-8b", "qwen2-0.5b", "qwen2-7b", "gemma-2b")}
    assert fams == {"llama-h4096", "llama-h896", "llama-h3584", "llama-h2048"}


def test_llm_rank_alpha_pattern_and_rslora(tmp_path):
    cfg = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 8, "lora_alpha": 16, "use_rslora": True,
           "rank_pattern": {"down_proj": 4}, "alpha_pattern": {"v_proj": 4}}
    ad = load_adapter(_peft_folder(tmp_path / "p", _llm_modules("llama-3-8b", cfg["target_modules"]), 8, cfg))
    q, v, d = (ad.module(f"layers.0.{n}") for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert q.scale == pytest.approx(16 / 8 ** 0.5) and v.scale == pytest.approx(4 / 8 ** 0.5)
    assert d.rank == 4 and d.scale == pytest.approx(16 / 2) and d.shape == (4096, 14336)


def test_llm_adapter_name_left_in_and_weights_without_config(tmp_path):
    mods = _llm_modules("mistral-7b", ["q_proj", "k_proj"])
    named = load_adapter(_peft_folder(tmp_path / "n", mods, 8, {}, adapter_name="default"))
    assert [m.name for m in named.modules][:2] == ["layers.0.self_attn.k_proj", "layers.0.self_attn.q_proj"]
    assert named.modules[0].shape == (1024, 4096) and named.family == "llama-h4096"
    bare = _peft_folder(tmp_path / "bare", mods, 8, None) / "adapter_model.safetensors"
    ad = load_adapter(bare)
    assert ad.format == "peft-file" and ad.family == "llama-h4096" and ad.modules[0].scale == 1.0
    assert any("without adapter_config.json" in w for w in ad.warnings)
    # the same weights with their config next to them: the config's alpha applies
    (bare.parent / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 32}))
    assert load_adapter(bare).modules[0].scale == 4.0


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    mods = {f"transformer.h.{i}.attn.c_attn": (2304, 768) for i in range(2)}
    mods.update({f"transformer.h.{i}.mlp.c_fc": (3072, 768) for i in range(2)})
    ad = load_adapter(_peft_folder(tmp_path / "g", mods, 4, {"target_modules": ["c_attn", "c_fc"],
                                                               "fan_in_fan_out": True, "lora_alpha": 8}))
    assert ad.family == "gpt2-h768"
    m = ad.module("h.0.attn.c_attn")
    assert m.shape == (2304, 768) and m.A.shape == (4, 768) and m.scale == 2.0


# ---- Flux ---------------------------------------------------------------------------------------
H = 3072
FLUX_FUSED = {   # BFL module → shape (out, in), from sd-scripts convert_flux_lora.py
    "double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.0.img_attn.proj": (H, H),
    "double_blocks.0.img_mlp.0": (4 * H, H), "double_blocks.0.img_mlp.2": (H, 4 * H),
    "double_blocks.0.img_mod.lin": (6 * H, H), "double_blocks.0.txt_attn.qkv": (3 * H, H),
    "double_blocks.0.txt_attn.proj": (H, H), "double_blocks.18.txt_mlp.0": (4 * H, H),
    "double_blocks.18.txt_mod.lin": (6 * H, H),
    "single_blocks.37.linear1": (7 * H, H), "single_blocks.37.linear2": (H, 5 * H),
    "single_blocks.37.modulation.lin": (3 * H, H),
    "img_in": (H, 64), "time_in.in_layer": (H, 256), "final_layer.adaLN_modulation.1": (2 * H, H),
}
DIFFUSERS_SPLIT = {   # BFL module → [(diffusers module, rows)]
    "double_blocks.0.img_attn.qkv": [("transformer_blocks.0.attn.to_q", H), ("transformer_blocks.0.attn.to_k", H),
                                     ("transformer_blocks.0.attn.to_v", H)],
    "double_blocks.0.img_attn.proj": [("transformer_blocks.0.attn.to_out.0", H)],
    "double_blocks.0.img_mlp.0": [("transformer_blocks.0.ff.net.0.proj", 4 * H)],
    "double_blocks.0.img_mlp.2": [("transformer_blocks.0.ff.net.2", H)],
    "double_blocks.0.img_mod.lin": [("transformer_blocks.0.norm1.linear", 6 * H)],
    "double_blocks.0.txt_attn.qkv": [("transformer_blocks.0.attn.add_q_proj", H),
                                     ("transformer_blocks.0.attn.add_k_proj", H),
                                     ("transformer_blocks.0.attn.add_v_proj", H)],
    "double_blocks.0.txt_attn.proj": [("transformer_blocks.0.attn.to_add_out", H)],
    "double_blocks.18.txt_mlp.0": [("transformer_blocks.18.ff_context.net.0.proj", 4 * H)],
    "double_blocks.18.txt_mod.lin": [("transformer_blocks.18.norm1_context.linear", 6 * H)],
    "single_blocks.37.linear1": [("single_transformer_blocks.37.attn.to_q", H),
                                 ("single_transformer_blocks.37.attn.to_k", H),
                                 ("single_transformer_blocks.37.attn.to_v", H),
                                 ("single_transformer_blocks.37.proj_mlp", 4 * H)],
    "single_blocks.37.linear2": [("single_transformer_blocks.37.proj_out", H)],
    "single_blocks.37.modulation.lin": [("single_transformer_blocks.37.norm.linear", 3 * H)],
    "img_in": [("x_embedder", H)], "time_in.in_layer": [("time_text_embed.timestep_embedder.linear_1", H)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", 2 * H)],
}
R, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def flux_factors():
    rng = np.random.default_rng(7)
    return {k: (rng.standard_normal((R, s[1])).astype(np.float32) * 0.1,
                rng.standard_normal((s[0], R)).astype(np.float32) * 0.1) for k, s in FLUX_FUSED.items()}


def _flux_kohya(path, f, alpha_dtype=torch.bfloat16):
    t = {}
    for k, (A, B) in f.items():
        n = "lora_unet_" + k.replace(".", "_")
        t[f"{n}.lora_down.weight"] = torch.from_numpy(A).bfloat16()
        t[f"{n}.lora_up.weight"] = torch.from_numpy(B).bfloat16()
        t[f"{n}.alpha"] = torch.tensor(ALPHA, dtype=alpha_dtype)
    t["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = _t(R, 768)
    t["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = _t(768, R)
    save_file(t, str(path), metadata={"ss_network_module": "networks.lora_flux", "ss_network_dim": "4",
                                      "ss_network_alpha": "2.0", "modelspec.architecture": "flux-1-dev/lora"})
    return path


def _flux_bfl(path, f):
    t = {}
    for k, (A, B) in f.items():
        t[f"diffusion_model.{k}.lora_A.weight"] = torch.from_numpy(A * ALPHA / R)     # alpha folded in
        t[f"diffusion_model.{k}.lora_B.weight"] = torch.from_numpy(B)
    save_file(t, str(path))
    return path


def _flux_diffusers(path, f):
    t, row = {}, 0
    for k, (A, B) in f.items():
        row = 0
        if k == "final_layer.adaLN_modulation.1":     # diffusers: (scale, shift); BFL: (shift, scale)
            B = np.concatenate([B[H:], B[:H]])
        for name, n in DIFFUSERS_SPLIT[k]:
            t[f"transformer.{name}.lora_A.weight"] = torch.from_numpy(A.copy())
            t[f"transformer.{name}.lora_B.weight"] = torch.from_numpy(B[row:row + n].copy())
            row += n
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": R, "transformer.lora_alpha": ALPHA,
                                                                 "transformer.use_rslora": False})}
    save_file(t, str(path), metadata=meta)
    return path


def test_flux_kohya_bfl_and_diffusers_are_one_naming_and_the_same_update(tmp_path, flux_factors):
    k = load_adapter(_flux_kohya(tmp_path / "k.safetensors", flux_factors))
    b = load_adapter(_flux_bfl(tmp_path / "b.safetensors", flux_factors))
    d = load_adapter(_flux_diffusers(tmp_path / "d.safetensors", flux_factors))
    assert k.family == b.family == d.family == "flux"
    flux_names = sorted("transformer." + n for parts in DIFFUSERS_SPLIT.values() for n, _ in parts)
    assert [m.name for m in d.modules] == flux_names
    assert [m.name for m in b.modules] == flux_names
    assert [m.name for m in k.modules if m.name.startswith("transformer.")] == flux_names
    assert not any("heuristic" in w for w in k.warnings)
    q = k.module("transformer.single_transformer_blocks.37.proj_mlp")
    assert q.shape == (4 * H, H) and q.rank == R and q.scale == ALPHA / R and q.alpha == ALPHA
    A, B = flux_factors["single_blocks.37.linear1"]
    Ab, Bb = (torch.from_numpy(x).bfloat16().float().numpy() for x in (A, B))     # as stored
    np.testing.assert_allclose(q.scale * q.B[:64] @ q.A, ALPHA / R * Bb[3 * H:3 * H + 64] @ Ab, rtol=1e-5, atol=1e-6)
    assert relative_difference(b, d) < 1e-5
    k_dit = dataclasses.replace(k, modules=[m for m in k.modules if m.name.startswith("transformer.")])
    assert relative_difference(b, k_dit) < 1e-2     # kohya file stored bf16
    assert k.module("text_encoder.text_model.encoder.layers.0.self_attn.q_proj").shape == (768, 768)


def test_flux_xlabs_layout(tmp_path, flux_factors):
    xl = {"double_blocks.0.img_attn.qkv": "double_blocks.0.processor.qkv_lora1",
          "double_blocks.0.txt_attn.qkv": "double_blocks.0.processor.qkv_lora2",
          "double_blocks.0.img_attn.proj": "double_blocks.0.processor.proj_lora1",
          "double_blocks.0.txt_attn.proj": "double_blocks.0.processor.proj_lora2",
          "single_blocks.37.linear2": "single_blocks.37.processor.proj_lora"}
    t = {}
    for bfl, x in xl.items():
        A, B = flux_factors[bfl]
        t[f"{x}.down.weight"], t[f"{x}.up.weight"] = torch.from_numpy(A * ALPHA / R), torch.from_numpy(B)
    A, B = flux_factors["single_blocks.37.linear1"]
    t["single_blocks.37.processor.qkv_lora.down.weight"] = torch.from_numpy(A * ALPHA / R)
    t["single_blocks.37.processor.qkv_lora.up.weight"] = torch.from_numpy(B[:3 * H].copy())
    save_file(t, str(tmp_path / "x.safetensors"))
    x = load_adapter(tmp_path / "x.safetensors")
    assert x.family == "flux" and x.format == "xlabs" and not x.unknown_keys
    ref = load_adapter(_flux_bfl(tmp_path / "b.safetensors", flux_factors))
    names = {m.name for m in x.modules}
    assert "transformer.single_transformer_blocks.37.attn.to_v" in names and len(names) == 12
    ref = dataclasses.replace(ref, modules=[m for m in ref.modules if m.name in names])
    assert relative_difference(ref, x) < 1e-5


def test_flux_block_diagonal_qkv_is_split_to_its_own_rank(tmp_path):
    """kohya split_qkv / diffusers→kohya: A [3r, in], B block-diagonal [9216, 3r]."""
    rng = np.random.default_rng(3)
    As = [rng.standard_normal((R, H)).astype(np.float32) for _ in range(3)]
    Bs = [rng.standard_normal((H, R)).astype(np.float32) for _ in range(3)]
    B = np.zeros((3 * H, 3 * R), np.float32)
    for i in range(3):
        B[i * H:(i + 1) * H, i * R:(i + 1) * R] = Bs[i]
    n = "lora_unet_double_blocks_5_img_attn_qkv"
    save_file({f"{n}.lora_down.weight": torch.from_numpy(np.concatenate(As)),
               f"{n}.lora_up.weight": torch.from_numpy(B),
               f"{n}.alpha": torch.tensor(6.0)}, str(tmp_path / "s.safetensors"))
    ad = load_adapter(tmp_path / "s.safetensors")
    k = ad.module("transformer.transformer_blocks.5.attn.to_k")
    assert k.rank == R and k.scale == pytest.approx(6.0 / (3 * R))
    np.testing.assert_allclose(delta_weight(k), 0.5 * Bs[1] @ As[1], rtol=1e-5, atol=1e-5)
    assert any("block-diagonal" in w for w in ad.warnings)


def test_flux_onetrainer_and_fal_names(tmp_path):
    t = {"lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight": _t(4, H),
         "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_up.weight": _t(H, 4),
         "lora_transformer_transformer_blocks_2_norm1_context_linear.lora_down.weight": _t(4, H),
         "lora_transformer_transformer_blocks_2_norm1_context_linear.lora_up.weight": _t(6 * H, 4)}
    save_file(t, str(tmp_path / "ot.safetensors"))
    ot = load_adapter(tmp_path / "ot.safetensors")
    assert ot.family == "flux" and not ot.warnings
    assert [m.name for m in ot.modules] == ["transformer.single_transformer_blocks.0.attn.to_q",
                                            "transformer.transformer_blocks.2.norm1_context.linear"]
    t = {"base_model.model.double_blocks.0.img_mod.lin.lora_A.weight": _t(4, H),
         "base_model.model.double_blocks.0.img_mod.lin.lora_B.weight": _t(6 * H, 4)}
    save_file(t, str(tmp_path / "fal.safetensors"))
    fal = load_adapter(tmp_path / "fal.safetensors")
    assert fal.family == "flux" and fal.modules[0].name == "transformer.transformer_blocks.0.norm1.linear"


# ---- SD3 / SDXL / SD2 ----------------------------------------------------------------------------
def _kohya_file(path, mods, r=4, alphas=None, metadata=None, dtype=torch.float16):
    t = {}
    for i, (name, shape) in enumerate(mods.items()):
        rr = r[i % len(r)] if isinstance(r, list) else r
        t[f"{name}.lora_down.weight"] = _t(rr, *shape[1:], dtype=dtype)
        t[f"{name}.lora_up.weight"] = _t(shape[0], rr, *([1, 1] if len(shape) == 4 else []), dtype=dtype)
        if alphas is not None:
            t[f"{name}.alpha"] = torch.tensor(alphas[i % len(alphas)], dtype=dtype)
    save_file(t, str(path), metadata=metadata)
    return load_adapter(path)


@pytest.mark.parametrize("h, fam", [(1536, "sd3"), (2432, "sd3.5-large")])
def test_sd3_kohya_and_diffusers_are_one_naming(tmp_path, h, fam):
    rng = np.random.default_rng(5)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    fused = {"joint_blocks.0.x_block.attn.qkv": (f(4, h), f(3 * h, 4)),
             "joint_blocks.0.x_block.mlp.fc2": (f(4, 4 * h), f(h, 4)),
             "joint_blocks.23.context_block.adaLN_modulation.1": (f(4, h), f(2 * h, 4))}   # last block: pre-only
    t = {}
    for k, (A, B) in fused.items():
        n = "lora_unet_" + k.replace(".", "_")
        t[f"{n}.lora_down.weight"], t[f"{n}.lora_up.weight"] = torch.from_numpy(A), torch.from_numpy(B)
        t[f"{n}.alpha"] = torch.tensor(2.0)
    save_file(t, str(tmp_path / "k.safetensors"))
    k = load_adapter(tmp_path / "k.safetensors")
    assert k.family == fam and not k.warnings
    A, B = fused["joint_blocks.0.x_block.attn.qkv"]
    fc2A, fc2B = fused["joint_blocks.0.x_block.mlp.fc2"]
    adA, adB = fused["joint_blocks.23.context_block.adaLN_modulation.1"]
    split = {"transformer_blocks.0.attn.to_q": (A, B[:h]), "transformer_blocks.0.attn.to_k": (A, B[h:2 * h]),
             "transformer_blocks.0.attn.to_v": (A, B[2 * h:]), "transformer_blocks.0.ff.net.2": (fc2A, fc2B),
             "transformer_blocks.23.norm1_context.linear": (adA, np.concatenate([adB[h:], adB[:h]]))}
    t = {}
    for n, (A_, B_) in split.items():
        t[f"transformer.{n}.lora_A.weight"] = torch.from_numpy(A_.copy())
        t[f"transformer.{n}.lora_B.weight"] = torch.from_numpy(np.ascontiguousarray(B_))
    save_file(t, str(tmp_path / "d.safetensors"), metadata={"lora_adapter_metadata": json.dumps(
        {"transformer.r": 4, "transformer.lora_alpha": 2})})
    d = load_adapter(tmp_path / "d.safetensors")
    assert d.family == fam and d.modules[0].scale == 0.5
    assert [m.name for m in k.modules] == [m.name for m in d.modules] == sorted("transformer." + n for n in split)
    assert relative_difference(k, d) < 1e-6


def test_sdxl_kohya_with_diffusers_names_equals_sgm_names(tmp_path):
    diff = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
    a = _kohya_file(tmp_path / "a.safetensors",
                    {diff: (640, 2048), "lora_unet_mid_block_attentions_0_proj_in": (1280, 1280)})
    b = _kohya_file(tmp_path / "b.safetensors", {sgm: (640, 2048), "lora_unet_middle_block_1_proj_in": (1280, 1280)})
    assert a.family == b.family == "sdxl"
    assert [m.name for m in a.modules] == [m.name for m in b.modules] == [
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "unet.mid_block.attentions.0.proj_in"]
    assert not a.warnings and not b.warnings


def test_text_encoder_only_and_sd2(tmp_path):
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
          "lora_te2_text_model_encoder_layers_31_mlp_fc1": (5120, 1280)}
    assert _kohya_file(tmp_path / "te.safetensors", te).family == "sdxl"
    t = {"text_encoder_2.text_model.encoder.layers.3.self_attn.v_proj.lora_A.weight": _t(4, 1280),
         "text_encoder_2.text_model.encoder.layers.3.self_attn.v_proj.lora_B.weight": _t(1280, 4)}
    save_file(t, str(tmp_path / "te2.safetensors"))
    assert load_adapter(tmp_path / "te2.safetensors").family == "sdxl"
    sd2 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 1024),
           "lora_te_text_model_encoder_layers_22_self_attn_q_proj": (1024, 1024)}
    assert _kohya_file(tmp_path / "sd2.safetensors", sd2).family == "sd2"


# ---- LoCon, DoRA, mixed ranks --------------------------------------------------------------------
def test_locon_mixed_rank_block_alphas_and_conv(tmp_path):
    mods = {"lora_unet_down_blocks_0_resnets_0_conv1": (320, 320, 3, 3),
            "lora_unet_down_blocks_0_downsamplers_0_conv": (320, 320, 3, 3),
            "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q": (320, 320),
            "lora_te_text_model_encoder_layers_11_mlp_fc2": (768, 3072)}
    ad = _kohya_file(tmp_path / "l.safetensors", mods, r=[8, 4, 16, 2], alphas=[4.0, 1.0, 16.0, 0.0],
                     metadata={"ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4"}),
                               "ss_network_dim": "16", "ss_network_alpha": "Dynamic"})
    assert ad.family == "sd1"
    conv = ad.module("unet.down_blocks.0.resnets.0.conv1")
    assert conv.shape == (320, 320, 3, 3) and conv.A.shape == (8, 2880) and conv.scale == 0.5
    assert ad.module("unet.down_blocks.0.downsamplers.0.conv").scale == 0.25
    assert ad.module("text_encoder.text_model.encoder.layers.11.mlp.fc2").scale == 1.0    # alpha 0 → rank
    assert describe(ad)["ranks"] == {"2": 1, "4": 1, "8": 1, "16": 1}


def test_dora_is_read_with_a_warning(tmp_path):
    n = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{n}.lora_down.weight": _t(4, 640), f"{n}.lora_up.weight": _t(640, 4), f"{n}.alpha": torch.tensor(4.0),
               f"{n}.dora_scale": _t(640, 1)}, str(tmp_path / "k.safetensors"))
    d = describe(load_adapter(tmp_path / "k.safetensors"))
    assert d["n_modules"] == 1 and any("DoRA" in w for w in d["warnings"])
    p = _peft_folder(tmp_path / "p", _llm_modules("qwen2-0.5b", ["q_proj"]), 8, {"use_dora": True})
    from safetensors.torch import load_file
    t = load_file(str(p / "adapter_model.safetensors"))
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = _t(896)
    save_file(t, str(p / "adapter_model.safetensors"))
    ad = load_adapter(p)
    assert len(ad.modules) == 2 and any("DoRA" in w for w in ad.warnings)


# ---- container robustness ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_alpha_scalar_dtypes(tmp_path, dtype):
    n = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    save_file({f"{n}.lora_down.weight": _t(8, 768, dtype=dtype), f"{n}.lora_up.weight": _t(768, 8, dtype=dtype),
               f"{n}.alpha": torch.tensor(4.0, dtype=dtype)}, str(tmp_path / "a.safetensors"))
    assert load_adapter(tmp_path / "a.safetensors").modules[0].scale == 0.5


def test_fp8_factors(tmp_path):
    n = "lora_unet_single_blocks_3_linear2"
    A, B = _t(4, 5 * H), _t(H, 4)
    save_file({f"{n}.lora_down.weight": A.to(torch.float8_e4m3fn), f"{n}.lora_up.weight": B.to(torch.float8_e4m3fn),
               f"{n}.alpha": torch.tensor(4.0)}, str(tmp_path / "f.safetensors"))
    m = load_adapter(tmp_path / "f.safetensors").modules[0]
    assert m.dtype == "F8_E4M3" and m.name == "transformer.single_transformer_blocks.3.proj_out"
    np.testing.assert_array_equal(m.A, A.to(torch.float8_e4m3fn).float().numpy())


def test_huge_metadata_and_no_metadata(tmp_path):
    n = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    t = {f"{n}.lora_down.weight": _t(4, 768), f"{n}.lora_up.weight": _t(3072, 4)}
    tags = {"10_char": {f"tag{i}": i for i in range(200_000)}}          # ~4 MB of JSON
    meta = {"ss_tag_frequency": json.dumps(tags), "modelspec.thumbnail": "data:image/png;base64," + "A" * 2_000_000,
            "ss_network_dim": "4", "ss_num_epochs": "10", "modelspec.trigger_phrase": "mychar"}
    save_file(t, str(tmp_path / "big.safetensors"), metadata=meta)
    ad = load_adapter(tmp_path / "big.safetensors")
    assert ad.trigger_words[:2] == ["mychar", "tag199999"]
    d = describe(ad)
    assert "modelspec.thumbnail" not in d["metadata"] and d["metadata"]["ss_num_epochs"] == "10"
    save_file(t, str(tmp_path / "bare.safetensors"))
    bare = load_adapter(tmp_path / "bare.safetensors")
    assert bare.metadata == {} and bare.family == "sd1" and bare.trigger_words == []


@pytest.mark.parametrize("tdt, name", [(torch.float8_e5m2, "F8_E5M2"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_fp8_is_read_without_torch(tmp_path, monkeypatch, tdt, name):
    """Issue 8 changed this: fp8 (and bf16) are decoded in numpy, so reading needs no torch at all;
    the values equal torch's own fp8 → float32 conversion bit for bit."""
    import sys
    n = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    A, B = _t(4, 768).to(tdt), _t(768, 4).to(tdt)
    save_file({f"{n}.lora_down.weight": A, f"{n}.lora_up.weight": B}, str(tmp_path / "f.safetensors"))
    monkeypatch.setitem(sys.modules, "torch", None)
    m = load_adapter(tmp_path / "f.safetensors").modules[0]
    assert m.dtype == name
    assert np.array_equal(m.A, A.float().numpy()) and np.array_equal(m.B, B.float().numpy())


def test_numbers_and_booleans_written_as_strings(tmp_path):
    """Some trainers write every config value of ``lora_adapter_metadata`` as a string."""
    t = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": _t(4, 2048),
         "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": _t(640, 4)}
    meta = {"unet.r": "4", "unet.lora_alpha": "8", "unet.use_rslora": "false", "unet.alpha_pattern": {}}
    save_file(t, str(tmp_path / "s.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    ad = load_adapter(tmp_path / "s.safetensors")
    assert ad.family == "sdxl" and ad.modules[0].scale == 2.0
    meta["unet.use_rslora"] = "True"
    save_file(t, str(tmp_path / "r.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    assert load_adapter(tmp_path / "r.safetensors").modules[0].scale == pytest.approx(8 / 2)


def test_unknown_lm_family_does_not_move_with_targets(tmp_path):
    """GPT-NeoX (Pythia-1.4B, hidden 2048): no rule names it, but q,k,v-only and MLP-only adapters agree."""
    a = {f"gpt_neox.layers.{i}.attention.query_key_value": (6144, 2048) for i in range(3)}
    b = {f"gpt_neox.layers.{i}.mlp.dense_4h_to_h": (2048, 8192) for i in range(3)}
    b.update({"gpt_neox.layers.0.mlp.dense_h_to_4h": (8192, 2048)})
    fa = load_adapter(_peft_folder(tmp_path / "a", a, 8, {})).family
    fb = load_adapter(_peft_folder(tmp_path / "b", b, 8, {})).family
    assert fa == fb == "generic-gpt_neox-h2048"


def test_multimodal_wrappers_keep_the_language_model_family(tmp_path):
    """Gemma-3-4B (hidden 2560) under Gemma3ForConditionalGeneration, with and without a vision-tower LoRA."""
    text = {f"model.language_model.layers.{i}.self_attn.q_proj": (2048, 2560) for i in range(2)}
    vision = {"model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj": (1152, 1152)}
    a = load_adapter(_peft_folder(tmp_path / "a", text, 8, {}))
    b = load_adapter(_peft_folder(tmp_path / "b", {**text, **vision}, 8, {}))
    old = {f"language_model.model.layers.{i}.mlp.down_proj": (2560, 10240) for i in range(2)}
    c = load_adapter(_peft_folder(tmp_path / "c", old, 8, {}))
    assert a.family == b.family == c.family == "llama-h2560"
    assert a.modules[0].name == "layers.0.self_attn.q_proj" and c.modules[0].name == "layers.0.mlp.down_proj"
    assert b.module("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj") is not None


def test_flux_style_dit_of_another_width_is_its_own_family(tmp_path):
    n = "lora_unet_double_blocks_0_img_attn_proj"
    save_file({f"{n}.lora_down.weight": _t(4, 6144), f"{n}.lora_up.weight": _t(6144, 4)},
              str(tmp_path / "f2.safetensors"))
    ad = load_adapter(tmp_path / "f2.safetensors")
    assert ad.family == "flux-h6144" and ad.modules[0].name == "transformer.double_blocks.0.img_attn.proj"
