"""Every refusal: the exception type (exit 65 / 66), and a one-line reason naming what is wrong."""
from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorasearch.adapters import load_adapter, random_adapter, write_adapter
from lorasearch.errors import EXIT_BAD_INPUT, EXIT_MISSING, BadAdapterError, MissingError

torch.set_num_threads(1)
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def t(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def raw_file(path, header, data=b"", n=None):
    """A safetensors container written by hand, so that it can be wrong on purpose."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)
    return path


def refused(path, *needles):
    with pytest.raises(BadAdapterError) as ei:
        load_adapter(path)
    err = ei.value
    msg = str(err)
    assert err.exit_code == EXIT_BAD_INPUT and "\n" not in msg and msg.startswith(str(path))
    for n in needles:
        assert n.lower() in msg.lower(), msg
    return msg


def good_kohya(tmp_path, name="ok.safetensors"):
    ad = random_adapter("sd15", rank=2, targets=r"attn1\.to_[qk]$", dtype="float16")
    return write_adapter(ad, tmp_path / name, "kohya")


# ---- not safetensors at all -------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".safetensors"])
def test_torch_zip_pickle_refused_by_magic_bytes(tmp_path, suffix):
    p = tmp_path / f"x{suffix}"
    torch.save({f"{K}.lora_down.weight": torch.zeros(2, 2)}, p)
    assert p.read_bytes()[:4] == b"PK\x03\x04"
    refused(p, "pickle", "convert")


def test_raw_pickle_is_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"a": Boom()}, protocol=2))
    refused(p, "pickle")


def test_peft_folder_with_only_a_bin_is_refused(tmp_path):
    d = tmp_path / "peft"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    torch.save({"x": torch.zeros(1)}, d / "adapter_model.bin")
    refused(d, "adapter_model.bin", "pickle")


def test_gguf_and_html_and_json(tmp_path):
    g = tmp_path / "a.gguf"
    g.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    refused(g, "GGUF")
    h = tmp_path / "civitai.safetensors"
    h.write_text("<!DOCTYPE html><html><body>Rate limited</body></html>")
    refused(h, "HTML", "re-download")
    j = tmp_path / "adapter_config.safetensors"
    j.write_text('{"peft_type": "LORA"}')
    refused(j, "JSON")


def test_missing_path_is_exit_66(tmp_path):
    with pytest.raises(MissingError) as ei:
        load_adapter(tmp_path / "nope.safetensors")
    assert ei.value.exit_code == EXIT_MISSING


# ---- malformed safetensors ----------------------------------------------------------------------
def test_truncated_file_reports_byte_counts(tmp_path):
    p = good_kohya(tmp_path)
    b = p.read_bytes()
    p.write_bytes(b[:-1000])
    refused(p, "truncated", "1000 bytes missing")


def test_trailing_bytes(tmp_path):
    p = good_kohya(tmp_path)
    p.write_bytes(p.read_bytes() + b"\0" * 16)
    refused(p, "16 bytes after the last tensor")


def test_lying_header_length(tmp_path):
    p = good_kohya(tmp_path)
    b = bytearray(p.read_bytes())
    b[:8] = struct.pack("<Q", len(b) + 50)
    p.write_bytes(bytes(b))
    refused(p, "header length field says", "truncated")
    b[:8] = struct.pack("<Q", 1 << 40)
    p.write_bytes(bytes(b))
    refused(p, "no header length", "cap")     # issue 7: the value (= file bytes) is not echoed
    # a too-short length cuts the JSON
    raw_file(tmp_path / "short.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
             bytes(4), n=10)
    refused(tmp_path / "short.safetensors", "not valid JSON")


def test_overlapping_and_gapped_offsets(tmp_path):
    h = {f"{K}.lora_down.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
         f"{K}.lora_up.weight": {"dtype": "F32", "shape": [2, 1], "data_offsets": [4, 12]}}
    refused(raw_file(tmp_path / "ov.safetensors", h, bytes(12)), "overlaps")
    h[f"{K}.lora_up.weight"]["data_offsets"] = [12, 20]
    refused(raw_file(tmp_path / "gap.safetensors", h, bytes(20)), "gap of 4 bytes")


def test_shape_disagrees_with_offsets(tmp_path):
    h = {"a.lora_down.weight": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 16]}}
    refused(raw_file(tmp_path / "s.safetensors", h, bytes(16)), "needs 8 bytes", "span 16")


def test_bad_utf8_duplicate_keys_and_first_byte(tmp_path):
    refused(raw_file(tmp_path / "u.safetensors", b'{"\xff\xfe": 1}    '), "UTF-8", "byte 2")
    dup = (b'{"a.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
           b'"a.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}')
    refused(raw_file(tmp_path / "d.safetensors", dup, bytes(4)), "duplicate key", "a.lora_down.weight")
    sp = b' {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    refused(raw_file(tmp_path / "sp.safetensors", sp, bytes(4)), "must start with")


def test_entry_fields_and_dtype(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}
    refused(raw_file(tmp_path / "e.safetensors", h, bytes(4)), "exactly dtype, shape, data_offsets")
    h = {"a": {"dtype": "f16", "shape": [1], "data_offsets": [0, 2]}}
    refused(raw_file(tmp_path / "f.safetensors", h, bytes(2)), "unknown dtype")
    h = {"__metadata__": {"n": 3}}
    refused(raw_file(tmp_path / "m.safetensors", h), "__metadata__")


def test_empty_and_tiny(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    refused(tmp_path / "empty.safetensors", "0 bytes")
    refused(raw_file(tmp_path / "none.safetensors", {}), "no tensors")


# ---- not a (complete) LoRA ----------------------------------------------------------------------
@pytest.mark.parametrize("suffixes, algo", [
    (["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"], "LoHa"),
    (["lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"], "LoKr"),
    (["weight", "on_input"], "IA3"),
    (["oft_blocks", "alpha"], "OFT"),
    (["a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"], "GLoRA"),
    (["diff", "diff_b"], "full/diff"),
    (["w_norm", "b_norm"], "norm"),
])
def test_lycoris_algorithms_named_with_module_count(tmp_path, suffixes, algo):
    tensors = {}
    for i in range(3):
        for s in suffixes:
            tensors[f"{K[:-1]}{'qkv'[i]}.{s}"] = t(4, 4, seed=i) if s != "alpha" else torch.tensor(1.0)
    p = tmp_path / "lyco.safetensors"
    save_file(tensors, str(p), metadata={"ss_network_module": "lycoris.kohya",
                                         "ss_network_args": json.dumps({"algo": algo.lower()})})
    refused(p, algo, "x3 modules", "unsupported")


def test_peft_type_other_than_lora(tmp_path):
    p = write_adapter(random_adapter("minilm", rank=2), tmp_path / "loha", "peft")
    cfg = json.loads((p / "adapter_config.json").read_text())
    cfg["peft_type"] = "LOHA"
    (p / "adapter_config.json").write_text(json.dumps(cfg))
    refused(p, "peft_type='LOHA'")
    (p / "adapter_config.json").write_text("{not json")
    refused(p, "adapter_config.json is not valid JSON")


def test_orphan_half(tmp_path):
    p = tmp_path / "orphan.safetensors"
    save_file({f"{K}.lora_down.weight": t(4, 320), f"{K}.alpha": torch.tensor(4.0),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": t(3072, 4),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": t(4, 768)}, str(p))
    refused(p, "1 modules miss a LoRA half", "attn1.to_q", "lora_down.weight")


def test_rank_mismatch(tmp_path):
    p = tmp_path / "rank.safetensors"
    save_file({f"{K}.lora_down.weight": t(4, 320), f"{K}.lora_up.weight": t(320, 5)}, str(p))
    refused(p, "rank mismatch", "r=4", "(4, 320)", "(320, 5)")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_weights(tmp_path, bad):
    up = t(320, 4)
    up[3, 1] = bad
    p = tmp_path / "nan.safetensors"
    save_file({f"{K}.lora_down.weight": t(4, 320), f"{K}.lora_up.weight": up}, str(p))
    refused(p, "NaN/Inf", "1 ", "attn1.to_q")


def test_no_lora_tensors_at_all(tmp_path):
    p = tmp_path / "ckpt.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": t(4, 4),
               "first_stage_model.decoder.conv_in.bias": t(4)}, str(p))
    refused(p, "no LoRA tensors", "2 tensors")


def test_unknown_keys_reported_not_dropped(tmp_path, caplog):
    p = good_kohya(tmp_path)
    from safetensors import safe_open
    with safe_open(str(p), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["bundle_emb.mytoken.string_to_param.*"] = t(2, 768)
    save_file(tensors, str(p), metadata=meta)
    ad = load_adapter(p)
    assert ad.unknown_keys == ["bundle_emb.mytoken.string_to_param.*"]
    assert any("not LoRA factors" in w for w in ad.warnings)
    assert len(ad.modules) == 32


def test_dora_magnitude_and_lora_bias_are_reported(tmp_path):
    name = "base_model.model.encoder.layer.0.attention.self.query"
    p = tmp_path / "dora.safetensors"
    save_file({f"{name}.lora_A.weight": t(2, 384), f"{name}.lora_B.weight": t(384, 2),
               f"{name}.lora_magnitude_vector": t(384), f"{name}.lora_B.bias": t(384)}, str(p))
    ad = load_adapter(p)
    assert len(ad.modules) == 1 and ad.modules[0].name == "encoder.layer.0.attention.self.query"
    assert ad.unknown_keys == sorted([f"{name}.lora_B.bias", f"{name}.lora_magnitude_vector"])
    assert any("DoRA" in w for w in ad.warnings)


def test_peft_weights_file_passed_directly_uses_its_config(tmp_path):
    ad = random_adapter("minilm", rank=4, alpha=2)
    d = write_adapter(ad, tmp_path / "peft", "peft", dtype="F32")
    back = load_adapter(d / "adapter_model.safetensors")
    assert back.format == "peft" and back.modules[0].scale == 0.5


@pytest.mark.parametrize("n", [0x280, 0x27B, 0x23C])   # length bytes 80 02 / 7B 02 / 3C 02: pickle, '{', '<'
def test_length_field_that_looks_like_a_magic_number_is_still_safetensors(tmp_path, n):
    h = {f"{K}.lora_down.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
         f"{K}.lora_up.weight": {"dtype": "F32", "shape": [2, 1], "data_offsets": [8, 16]}}
    hb = json.dumps(h).encode()
    p = raw_file(tmp_path / "m.safetensors", hb + b" " * (n - len(hb)), np.ones(4, np.float32).tobytes())
    assert p.read_bytes()[:2] == struct.pack("<Q", n)[:2]
    ad = load_adapter(p)
    assert len(ad.modules) == 1 and ad.modules[0].scale == 1.0


def test_empty_and_overflowing_factors_are_refused(tmp_path):
    from safetensors.numpy import save_file as save_np

    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    p = tmp_path / "empty.safetensors"
    save_np({f"{base}.lora_down.weight": np.zeros((4, 0), np.float32),
               f"{base}.lora_up.weight": np.ones((320, 4), np.float32)}, str(p))
    with pytest.raises(BadAdapterError, match="empty weight"):
        load_adapter(p)
    p = tmp_path / "huge.safetensors"
    save_np({f"{base}.lora_down.weight": np.full((4, 320), 1e30, np.float32),
               f"{base}.lora_up.weight": np.ones((320, 4), np.float32)}, str(p))
    with pytest.raises(BadAdapterError, match="too large"):
        load_adapter(p)
