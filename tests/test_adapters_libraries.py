"""Cross-checks against independent implementations: diffusers' kohya→diffusers converter (incl. SDXL SGM
renumbering) and adapters saved by the PEFT library itself. Marked slow: importing diffusers/peft alone
takes several seconds."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorasearch.adapters import adapter_delta_error, delta_weight, load_adapter, random_adapter, write_adapter

torch.set_num_threads(1)
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_kohya_names_agree_with_diffusers_converter(tmp_path, arch):
    """diffusers' own kohya→diffusers conversion (incl. SGM renumbering) lands on our normalized names."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    from lorasearch.adapters.archs.generate import SD15_UNET, SDXL_UNET
    loader, cfg = ((StableDiffusionXLLoraLoaderMixin, SDXL_UNET) if arch == "sdxl"
                   else (StableDiffusionLoraLoaderMixin, SD15_UNET))
    ad = random_adapter(arch, rank=2, alpha=2, seed=7, conv=True, dtype="float16",
                        targets=r"(blocks\.[03]\.|mid_block|layers\.(0|30)\.)")
    p = write_adapter(ad, tmp_path / "k.safetensors", "kohya")
    sd, _ = loader.lora_state_dict(str(p), unet_config=SimpleNamespace(**cfg))
    q = tmp_path / "converted.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(q))
    back = load_adapter(q)
    assert back.format in ("diffusers-mid", "diffusers-old")
    assert adapter_delta_error(ad, back) < 1e-7


def test_real_peft_library_adapter_reads_to_peft_delta(tmp_path):
    """An adapter saved by PEFT itself on a BERT classifier: names lose the task wrapper and ΔW matches
    PEFT's get_delta_weight (alpha_pattern and rsLoRA included)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                                     num_attention_heads=12, vocab_size=100))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"], alpha_pattern={"value": 2},
                     use_rslora=True, init_lora_weights=False, task_type="SEQ_CLS")
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(tmp_path / "peft_bert")
    back = load_adapter(tmp_path / "peft_bert")
    assert back.family == "minilm" and len(back.modules) == 13
    assert back.module("embeddings.word_embeddings").shape == (100, 384)
    assert back.unknown_keys  # the classifier head (modules_to_save) is reported, not dropped
    checked = 0
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and ("default" in getattr(mod, "lora_A", {})
                                                 or "default" in getattr(mod, "lora_embedding_A", {})):
            ours = back.module(name.split("bert.", 1)[1])
            ref = mod.get_delta_weight("default").detach().numpy()
            np.testing.assert_allclose(delta_weight(ours), ref, rtol=1e-4, atol=1e-6)  # ref is float32
            checked += 1
    assert checked == 13


def test_diffusers_saved_lora_reads_to_peft_delta(tmp_path):
    """A UNet LoRA trained through diffusers+PEFT and saved by ``save_lora_weights`` (mixed lora_A / lora.down
    keys, alpha only in the ``lora_adapter_metadata`` header): ΔW equals PEFT's get_delta_weight."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    cfg = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
                     alpha_pattern={"proj_in": 8}, init_lora_weights=False)
    unet.add_adapter(cfg)
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=sd, unet_lora_adapter_metadata=cfg.to_dict())
    ad = load_adapter(tmp_path / "pytorch_lora_weights.safetensors")
    assert ad.unknown_keys == [] and len(ad.modules) == 36
    checked = 0
    for name, mod in unet.named_modules():
        if hasattr(mod, "get_delta_weight") and getattr(mod, "lora_A", None):
            ref = mod.get_delta_weight(next(iter(mod.lora_A))).detach().numpy()
            np.testing.assert_allclose(delta_weight(ad.module("unet." + name)), ref, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked == 36
    assert ad.module("unet.down_blocks.0.attentions.0.proj_in").scale == 2.0
