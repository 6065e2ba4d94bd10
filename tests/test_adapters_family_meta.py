"""Family from paths and shapes (never from targets or rank), metadata and trigger words, describe(),
adapter_sha256 and find_adapters."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from lorasearch.adapters import (adapter_sha256, describe, find_adapters, load_adapter, random_adapter,
                                 write_adapter)
from lorasearch.errors import MissingError

torch.set_num_threads(1)


def _family(tmp_path, arch, targets, fmt="kohya", rank=4, conv=False, metadata=None):
    ad = random_adapter(arch, rank=rank, targets=targets, conv=conv, seed=rank)
    name = f"{abs(hash((arch, targets, fmt, rank, conv)))}{'' if fmt == 'peft' else '.safetensors'}"
    p = write_adapter(ad, tmp_path / name, fmt, metadata=metadata)
    if fmt == "kohya":   # drop the trainer's base-model metadata: the family must come from keys and shapes
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(str(p), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(p), metadata=metadata)
    return load_adapter(p).family


@pytest.mark.parametrize("targets", [r"attention\.self\.value", r"attention\.self\.(query|key|value)",
                                     r"layer\.[0-2]\.output\.dense", r"intermediate"])
@pytest.mark.parametrize("rank", [4, 16])
def test_minilm_family_ignores_targets_and_rank(tmp_path, targets, rank):
    assert _family(tmp_path, "minilm", targets, fmt="peft", rank=rank) == "minilm"


@pytest.mark.parametrize("arch, fam", [("sd15", "sd1"), ("sdxl", "sdxl")])
@pytest.mark.parametrize("targets, conv", [
    (r"attn1\.", False),                        # self-attention only: no cross-attention width visible
    (r"attn2\.to_[kv]", False),
    (r"\.to_v$", False),
    (r"^text_encoder\.", False),                # CLIP-L only (SDXL: kohya lora_te1_ tells)
    (r"(proj_in|proj_out)$", False),
    (r"resnets\.\d\.conv[12]$", True),          # LoCon resnet convs only
    (None, False),
])
def test_sd_family_ignores_targets(tmp_path, arch, fam, targets, conv):
    assert _family(tmp_path, arch, targets, conv=conv) == fam


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "diffusers-mid", "kohya"])
def test_family_same_across_formats(tmp_path, fmt):
    assert _family(tmp_path, "sdxl", r"(attn2\.to_k|text_encoder_2.*layers\.0\.)", fmt=fmt) == "sdxl"
    assert _family(tmp_path, "sd15", r"up_blocks\.3\..*attn1\.to_q", fmt=fmt) == "sd1"


def test_metadata_names_the_family_first(tmp_path):
    meta = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    assert _family(tmp_path, "sd15", r"attn1\.to_q", metadata=meta) == "sdxl"
    assert _family(tmp_path, "sd15", r"attn1\.to_q", metadata={"ss_base_model_version": "sd_v2"}) == "sd2"


def test_kohya_metadata_and_trigger_words(tmp_path):
    tags = {"10_mychar": {"mychar": 40, "1girl": 38, "solo": 12}, "5_reg": {"1girl": 9, "outdoors": 3}}
    meta = {"ss_tag_frequency": json.dumps(tags), "modelspec.trigger_phrase": "mychar style",
            "modelspec.title": "My Character", "ss_output_name": "mychar_v1"}
    ad = random_adapter("sd15", rank=4, alpha=1, targets=r"attn2", dtype="float16")
    p = write_adapter(ad, tmp_path / "mychar.safetensors", "kohya", metadata=meta)
    back = load_adapter(p)
    assert back.trigger_words == ["mychar style", "1girl", "mychar", "solo", "outdoors"]
    assert back.metadata["ss_network_module"] == "networks.lora" and back.metadata["ss_network_dim"] == "4"
    info = describe(back)
    json.dumps(info)
    assert info["format"] == "kohya" and info["family"] == "sd1" and info["n_modules"] == len(ad.modules)
    assert info["ranks"] == {"4": len(ad.modules)} and info["alphas"] == {"1.0": len(ad.modules)}
    assert info["metadata"]["modelspec.title"] == "My Character"
    assert "ss_tag_frequency" not in info["metadata"]
    m = info["modules"][0]
    assert m["rank"] == 4 and m["alpha"] == 1.0 and m["scale"] == 0.25 and m["dtype"] == "F16"
    assert len(m["shape"]) == 2
    assert info["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest() == back.sha256
    assert info["size"] == p.stat().st_size


def test_peft_sha256_combines_weights_and_config(tmp_path):
    p = write_adapter(random_adapter("minilm", rank=2), tmp_path / "peft", "peft")
    h1 = adapter_sha256(p)
    assert load_adapter(p).sha256 == h1 and len(h1) == 64
    cfg = json.loads((p / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 99
    (p / "adapter_config.json").write_text(json.dumps(cfg))
    h2 = adapter_sha256(p)
    assert h2 != h1
    w = hashlib.sha256((p / "adapter_model.safetensors").read_bytes()).hexdigest()
    c = hashlib.sha256((p / "adapter_config.json").read_bytes()).hexdigest()
    assert h2 == hashlib.sha256(f"peft\n{w}\n{c}\n".encode()).hexdigest()
    with pytest.raises(MissingError):
        adapter_sha256(tmp_path / "nope.safetensors")


def test_find_adapters(tmp_path):
    root = tmp_path / "lib"
    (root / "sd" / "chars").mkdir(parents=True)
    (root / ".lorasearch").mkdir()
    ad = random_adapter("minilm", rank=2)
    write_adapter(ad, root / "sd" / "chars" / "b.safetensors", "peft-file")
    write_adapter(ad, root / "a.safetensors", "diffusers")
    write_adapter(ad, root / "peft_one", "peft")
    write_adapter(ad, root / "peft_one" / "other_adapter", "peft")      # PEFT non-default adapter subfolder
    (root / "old.ckpt").write_bytes(b"PK\x03\x04")
    (root / "q.GGUF").write_bytes(b"GGUF")
    (root / "notes.txt").write_text("hi")
    (root / ".lorasearch" / "hidden.safetensors").write_bytes(b"x")
    os.symlink(root, root / "sd" / "loop")                               # a cycle
    outside = tmp_path / "outside"
    outside.mkdir()
    write_adapter(ad, outside / "linked.safetensors", "peft-file")
    os.symlink(outside, root / "linked_dir")
    found = [str(p.relative_to(root)) for p in find_adapters(root)]
    assert found == ["a.safetensors", "linked_dir/linked.safetensors", "old.ckpt", "peft_one",
                     "peft_one/other_adapter", "q.GGUF", "sd/chars/b.safetensors"]
    assert find_adapters(root / "a.safetensors") == [root / "a.safetensors"]
    with pytest.raises(MissingError):
        find_adapters(tmp_path / "missing")
    for p in find_adapters(root):
        if p.suffix.lower() not in (".ckpt", ".gguf"):
            assert load_adapter(p).family == "minilm"


@pytest.mark.parametrize("keys, fam", [
    ({"transformer.single_transformer_blocks.0.attn.to_q": (3072, 3072)}, "flux"),
    ({"transformer.transformer_blocks.3.attn.to_v": (1536, 1536)}, "sd3"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv": (4608, 1536)}, "sd3"),
    ({"base_model.model.roberta.encoder.layer.11.attention.self.value": (768, 768)}, "bert-h768"),
    ({"base_model.model.model.layers.31.mlp.gate_proj": (14336, 4096)}, "llama-h4096"),
])
def test_dit_and_language_families(tmp_path, keys, fam):
    from safetensors.torch import save_file
    tensors = {}
    for stem, (out, inp) in keys.items():
        a, b = ("lora_down.weight", "lora_up.weight") if stem.startswith("lora_") else ("lora_A.weight", "lora_B.weight")
        tensors[f"{stem}.{a}"] = torch.ones(1, inp)
        tensors[f"{stem}.{b}"] = torch.ones(out, 1)
    save_file(tensors, str(tmp_path / "x.safetensors"))
    assert load_adapter(tmp_path / "x.safetensors").family == fam


@pytest.mark.parametrize("targets", [r"attn2\.to_k", r"proj_in", r"^text_encoder\..*layers\.22\."])
def test_sd2_family_from_cross_attention_projection_or_text_encoder(tmp_path, targets):
    assert _family(tmp_path, "sd2", targets) == "sd2"
