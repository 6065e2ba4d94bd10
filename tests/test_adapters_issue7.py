"""Issue 7, file level: every defect found by fuzzing and by files of today's producers, one test each.

Hostile files are written byte by byte (``raw_file``) so they can be wrong on purpose; producer files
are written with the real converters where the library is installed (diffusers'
``convert_state_dict_to_kohya``) and otherwise with the exact key grammar and shapes of the producer
(transformers 5 CLIP names, DiffSynth Flux, sentence-transformers 6, peft OFT).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorasearch.adapters import adapter_sha256, describe, find_adapters, load_adapter, random_adapter, write_adapter
from lorasearch.errors import EXIT_BAD_INPUT, BadAdapterError
from lorasearch.similarity import delta_cosine, relative_difference

torch.set_num_threads(1)
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
DEEP = "[" * 5000 + "]" * 5000


def t(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05)


def raw_file(path, header, data=b""):
    hb = header if isinstance(header, bytes) else header.encode() if isinstance(header, str) else \
        json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def refused(path, *needles):
    with pytest.raises(BadAdapterError) as ei:
        load_adapter(path)
    msg = str(ei.value)
    assert ei.value.exit_code == EXIT_BAD_INPUT and "\n" not in msg and msg.startswith(str(path))
    for n in needles:
        assert n.lower() in msg.lower(), msg
    return msg


def kohya_pair(tmp_path, name="k.safetensors", meta=None, alpha=None, dtype=torch.float32):
    ts = {f"{K}.lora_down.weight": t(4, 320).to(dtype), f"{K}.lora_up.weight": t(320, 4, seed=1).to(dtype)}
    if alpha is not None:
        ts[f"{K}.alpha"] = alpha
    save_file(ts, str(tmp_path / name), metadata=meta)
    return tmp_path / name


def peft_folder(tmp_path, cfg_extra=None, cfg_text=None, name="p"):
    ad = random_adapter("minilm", rank=4, targets=r"attention\.self\.(query|value)", seed=3)
    d = write_adapter(ad, tmp_path / name, "peft")
    if cfg_text is not None:
        (d / "adapter_config.json").write_text(cfg_text)
    elif cfg_extra is not None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(cfg_extra)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


# ---- JSON nested ~1,000+ deep ------------------------------------------------------------------
def test_deep_json_in_header_is_refused(tmp_path):
    p = raw_file(tmp_path / "h.safetensors", '{"a": ' + DEEP + "}")
    refused(p, "nests JSON")


def test_deep_json_in_adapter_config_is_refused(tmp_path):
    d = peft_folder(tmp_path, cfg_text='{"peft_type": "LORA", "x": ' + DEEP + "}")
    refused(d, "adapter_config.json", "nests JSON")


@pytest.mark.parametrize("key", ["ss_tag_frequency", "modelspec.title", "lora_adapter_metadata"])
def test_deep_json_in_metadata_string_costs_the_value_not_the_file(tmp_path, key):
    ad = load_adapter(kohya_pair(tmp_path, meta={key: DEEP, "ss_output_name": "x"}))
    assert len(ad.modules) == 1 and ad.trigger_words == []
    json.dumps(describe(ad))
    if key == "lora_adapter_metadata":
        assert any("lora_adapter_metadata" in w and "ignored" in w for w in ad.warnings)


# ---- lora_alpha / alpha_pattern / rank_pattern of the wrong type --------------------------------
BAD_ALPHAS = ["eight", None, [8], {"a": 8}, 10 ** 400, True]


@pytest.mark.parametrize("bad", BAD_ALPHAS, ids=["str", "null", "list", "dict", "bigint", "bool"])
def test_bad_lora_alpha_in_adapter_config(tmp_path, bad):
    text = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 0}).replace('"lora_alpha": 0',
                                                                             f'"lora_alpha": {json.dumps(bad)}')
    refused(peft_folder(tmp_path, cfg_text=text), "lora_alpha")


@pytest.mark.parametrize("bad", BAD_ALPHAS, ids=["str", "null", "list", "dict", "bigint", "bool"])
def test_bad_lora_alpha_in_lora_adapter_metadata(tmp_path, bad):
    n = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    meta = json.dumps({"unet.r": 4, "unet.lora_alpha": 0}).replace('"unet.lora_alpha": 0',
                                                                  f'"unet.lora_alpha": {json.dumps(bad)}')
    save_file({f"{n}.lora_A.weight": t(4, 2048), f"{n}.lora_B.weight": t(640, 4)}, str(tmp_path / "d.safetensors"),
              metadata={"lora_adapter_metadata": meta})
    refused(tmp_path / "d.safetensors", "lora_alpha")


@pytest.mark.parametrize("field, value", [
    ("alpha_pattern", ["query"]), ("alpha_pattern", "query=2"), ("alpha_pattern", {"query": "two"}),
    ("alpha_pattern", {"query": None}), ("alpha_pattern", {"query": {"x": 1}}), ("alpha_pattern", {"": 2}),
    ("rank_pattern", [1]), ("rank_pattern", {"query": "x"}), ("rank_pattern", {"query": -1}),
])
def test_bad_patterns_are_refused(tmp_path, field, value):
    refused(peft_folder(tmp_path, {field: value}), field)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_lora_alpha_is_refused_not_a_nan_scale(tmp_path, bad):
    text = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 0}).replace('"lora_alpha": 0', f'"lora_alpha": {bad}')
    refused(peft_folder(tmp_path, cfg_text=text), "lora_alpha", "finite")


def test_f64_alpha_too_large_for_float32_is_refused_without_numpy_warnings(tmp_path, capfd):
    p = kohya_pair(tmp_path, alpha=torch.tensor(1e300, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refused(p, "alpha is inf")
    assert capfd.readouterr().err == ""


def test_ss_tag_frequency_overflowing_counts_are_skipped(tmp_path):
    freq = '{"10_x": {"big": 1e400, "inf": Infinity, "nan": NaN, "ok": 3, "s": "2", "u": "\u00b2", "i": 1%s}}' % ("0" * 400)
    ad = load_adapter(kohya_pair(tmp_path, meta={"ss_tag_frequency": freq}))
    assert ad.trigger_words == ["ok", "s"]


# ---- tensors: dtype, zero sizes, huge dimensions, fp8/bf16 -------------------------------------
def test_non_string_dtype_is_refused(tmp_path):
    h = {f"{K}.lora_down.weight": {"dtype": ["F16"], "shape": [1, 1], "data_offsets": [0, 2]}}
    refused(raw_file(tmp_path / "d.safetensors", h, b"\0\0"), "unknown dtype")


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2", "F16", "BF16"])
def test_zero_size_factor_is_refused_as_rank_0(tmp_path, dtype):
    h = {f"{K}.lora_down.weight": {"dtype": dtype, "shape": [0, 320], "data_offsets": [0, 0]},
         f"{K}.lora_up.weight": {"dtype": dtype, "shape": [320, 0], "data_offsets": [0, 0]}}
    refused(raw_file(tmp_path / "z.safetensors", h), "rank 0")


@pytest.mark.parametrize("shape", [[0, 2 ** 62], [2 ** 62, 0], [0, 2 ** 63 - 1, 2 ** 63 - 1]])
def test_huge_dimension_next_to_a_zero_is_refused(tmp_path, shape):
    h = {f"{K}.lora_down.weight": {"dtype": "F8_E4M3", "shape": shape, "data_offsets": [0, 0]}}
    refused(raw_file(tmp_path / "z.safetensors", h), "invalid shape")


def test_bf16_is_decoded_exactly_in_numpy(tmp_path):
    p = kohya_pair(tmp_path, dtype=torch.bfloat16)
    with open(p, "rb"):
        pass
    m = load_adapter(p).modules[0]
    assert m.dtype == "BF16"
    assert np.array_equal(m.A, t(4, 320).to(torch.bfloat16).float().numpy())


def test_reading_imports_no_torch(tmp_path):
    p = kohya_pair(tmp_path, dtype=torch.float8_e4m3fn)
    code = f"""
        import sys
        from lorasearch.adapters import load_adapter
        ad = load_adapter({str(p)!r})
        assert ad.modules[0].dtype == "F8_E4M3"
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ---- alpha_pattern: linear time, PEFT semantics --------------------------------------------------
def _load_in_child(path, timeout=60):
    code = f"""
        from lorasearch.adapters import load_adapter
        from lorasearch.errors import BadAdapterError
        try:
            ad = load_adapter({str(path)!r})
            print("OK", [m.scale for m in ad.modules])
        except BadAdapterError as e:
            print("REFUSED", e)
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_catastrophic_alpha_pattern_runs_in_linear_time(tmp_path):
    d = peft_folder(tmp_path, {"alpha_pattern": {"([a-z_0-9.]+)*!": 2, "value": 16}})
    out = _load_in_child(d)        # Python's re takes ~forever on this; RE2 answers at once
    assert out.startswith("OK") and "4.0" in out     # value modules: 16 / r=4


def test_pattern_needing_backtracking_features_is_refused_with_a_reason(tmp_path):
    refused(peft_folder(tmp_path, {"alpha_pattern": {r"(quer)y\1": 2}}), "alpha_pattern", "backreferences")
    refused(peft_folder(tmp_path, {"alpha_pattern": {r"(?=query)query": 2}}), "alpha_pattern", "lookaround")


def test_alpha_pattern_keeps_peft_first_match_semantics(tmp_path):
    import re
    pats = {r"layer\.[0-2]\.attention\.self\.query": 2.0, "query": 12.0, "self.val.*": 6.0, "[unclosed": 1.0}
    ad = load_adapter(peft_folder(tmp_path, {"alpha_pattern": pats, "lora_alpha": 4}))
    for m in ad.modules:
        want = next((v for p, v in pats.items() if _peft_match(re, p, m.name)), 4.0)
        assert m.alpha == want and m.scale == want / 4, m.name


def _peft_match(re, p, key):
    try:
        return re.match(rf"(.*\.)?({p})$", key) is not None
    except re.error:
        return key == p or key.endswith("." + p)


# ---- special files, echoes ------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_never_opened(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    assert find_adapters(tmp_path) == [fifo]        # listed, so that the caller can report it
    code = f"""
        from lorasearch.adapters import load_adapter, adapter_sha256
        from lorasearch.errors import BadAdapterError
        for f in (load_adapter, adapter_sha256):
            try:
                f({str(fifo)!r}); print("ACCEPTED")
            except BadAdapterError as e:
                print(e)
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stderr
    assert all("FIFO" in x and "not a regular file" in x for x in lines), lines
    assert find_adapters(fifo) == [fifo]


def test_symlink_to_a_text_file_names_its_kind_and_never_echoes_it(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n")
    link = tmp_path / "l.safetensors"
    link.symlink_to(secret)
    msg = refused(link, "a text file")
    assert "root" not in msg.replace(str(tmp_path), "") and "x:0" not in msg
    assert str(struct.unpack("<Q", b"root:x:0")[0]) not in msg      # not even as the "length" it encodes


def test_binary_garbage_names_its_kind(tmp_path):
    p = tmp_path / "g.safetensors"
    p.write_bytes(b"\x7fELF" + bytes(range(200)))
    msg = refused(p, "ELF")
    assert "\\x" not in msg


# ---- files as real producers write them -----------------------------------------------------------
def _peft_state_dict(ad, prefix_map=None):
    out = {}
    for m in ad.modules:
        name = m.name
        for old, new in (prefix_map or {}).items():
            if name.startswith(old):
                name = new + name[len(old):]
        out[f"{name}.lora_A.weight"] = torch.from_numpy(m.A.copy())
        out[f"{name}.lora_B.weight"] = torch.from_numpy(m.B.copy())
    return out


@pytest.mark.parametrize("targets", [
    r"(down_blocks\.0\..*attn1\.to_q|text_model\.encoder\.layers\.0\.self_attn\.q_proj)$",
    r"(attn[12]\.(to_q|to_out\.0)|text_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|out_proj))$",   # no attn2 k/v
])
def test_diffusers_convert_to_kohya_sd15_with_text_encoder_stays_sd1(tmp_path, targets):
    from diffusers.utils import convert_state_dict_to_kohya
    # no cross-attention k/v (the width that names the family) but CLIP-L, written lora_te1_: the UNet
    # layout (attention in down_blocks.0, 1-block transformers) must decide
    ad = random_adapter("sd15", rank=4, targets=targets, seed=5)
    sd = _peft_state_dict(ad)
    save_file(convert_state_dict_to_kohya(sd), str(tmp_path / "k.safetensors"))
    save_file(sd, str(tmp_path / "d.safetensors"))
    k, d = load_adapter(tmp_path / "k.safetensors"), load_adapter(tmp_path / "d.safetensors")
    assert any(key.startswith("lora_te1_") for key in _keys(tmp_path / "k.safetensors"))
    assert k.family == d.family == "sd1" and k.family_note is None
    assert [m.name for m in k.modules] == [m.name for m in d.modules]
    assert delta_cosine(k, d) == pytest.approx(1.0, abs=1e-9) and relative_difference(k, d) < 1e-6


def _keys(p):
    from safetensors import safe_open
    with safe_open(str(p), "np") as f:
        return list(f.keys())


@pytest.mark.parametrize("fam_arch, kohya_prefix", [("sd15", "lora_te_"), ("sdxl", "lora_te1_")])
def test_text_encoder_only_file_is_flagged_ambiguous(tmp_path, fam_arch, kohya_prefix):
    ad = random_adapter(fam_arch, rank=4, targets=r"^text_encoder\.text_model\.encoder\.layers\.0\.self_attn", seed=2)
    p = write_adapter(ad, tmp_path / "te.safetensors", "kohya")
    from safetensors.torch import load_file
    sd = load_file(str(p))
    assert all(k.startswith(kohya_prefix) for k in sd)
    save_file(sd, str(p))      # no ss_base_model_version: only the modules can tell
    back = load_adapter(p)
    assert back.family == ("sd1" if fam_arch == "sd15" else "sdxl")
    info = describe(back)
    assert info["family_note"] and "sd1" in info["family_note"] and "sdxl" in info["family_note"]


def test_transformers5_clip_names_equal_the_text_model_names(tmp_path):
    from diffusers.utils import convert_state_dict_to_kohya
    ad = random_adapter("sd15", rank=4, targets=r"(text_encoder\..*layers\.[01]\.self_attn\.[qv]_proj|attn2\.to_k)$",
                        seed=7)
    old = _peft_state_dict(ad)                                                      # transformers 4
    new = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in old.items()}   # transformers 5
    assert any(k.startswith("text_encoder.encoder.layers.0.") for k in new)
    save_file(old, str(tmp_path / "old.safetensors"))
    save_file(new, str(tmp_path / "new.safetensors"))
    save_file(convert_state_dict_to_kohya(new), str(tmp_path / "new_kohya.safetensors"))
    a, b, c = (load_adapter(tmp_path / f) for f in ("old.safetensors", "new.safetensors", "new_kohya.safetensors"))
    assert [m.name for m in a.modules] == [m.name for m in b.modules] == [m.name for m in c.modules]
    assert any(m.name.startswith("text_encoder.text_model.encoder.layers.0.") for m in b.modules)
    assert a.family == b.family == c.family == "sd1"
    assert delta_cosine(a, b) == pytest.approx(1.0, abs=1e-9) and delta_cosine(a, c) == pytest.approx(1.0, abs=1e-9)
    assert not c.warnings


def test_diffsynth_flux_keys_without_transformer_prefix(tmp_path):
    r, H = 4, 3072
    A, Bq, Bk, Bv = t(r, H, seed=1), t(H, r, seed=2), t(H, r, seed=3), t(H, r, seed=4)
    A2, B2 = t(r, 5 * H, seed=5), t(H, r, seed=6)
    diffsynth = {}
    for part, B in (("to_q", Bq), ("to_k", Bk), ("to_v", Bv)):
        diffsynth[f"transformer_blocks.0.attn.{part}.lora_A.weight"] = A.clone()
        diffsynth[f"transformer_blocks.0.attn.{part}.lora_B.weight"] = B
    diffsynth["single_transformer_blocks.0.proj_out.lora_A.weight"] = A2
    diffsynth["single_transformer_blocks.0.proj_out.lora_B.weight"] = B2
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": A,
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.cat([Bq, Bk, Bv]),
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float(r)),
             "lora_unet_single_blocks_0_linear2.lora_down.weight": A2,
             "lora_unet_single_blocks_0_linear2.lora_up.weight": B2,
             "lora_unet_single_blocks_0_linear2.alpha": torch.tensor(float(r))}
    diffusers = {f"transformer.{k}": v.clone() for k, v in diffsynth.items()}
    for name, sd in (("ds", diffsynth), ("k", kohya), ("df", diffusers)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    ds, k, df = (load_adapter(tmp_path / f"{n}.safetensors") for n in ("ds", "k", "df"))
    assert ds.family == k.family == df.family == "flux"
    assert [m.name for m in ds.modules] == [m.name for m in k.modules] == [m.name for m in df.modules] == [
        "transformer.single_transformer_blocks.0.proj_out", "transformer.transformer_blocks.0.attn.to_k",
        "transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_v"]
    assert delta_cosine(ds, k) == pytest.approx(1.0, abs=1e-9) and relative_difference(ds, df) < 1e-12


def _minilm_peft(tmp_path, name, prefix, ad):
    d = write_adapter(ad, tmp_path / name, "peft")
    p = d / "adapter_model.safetensors"
    from safetensors.torch import load_file
    sd = load_file(str(p))
    save_file({k.replace("base_model.model.", f"base_model.model.{prefix}"): v for k, v in sd.items()}, str(p))
    return d


def test_sentence_transformers6_wrapper_reads_as_minilm(tmp_path):
    ad = random_adapter("minilm", rank=4, targets=r"attention\.self\.(query|value)", seed=9, alpha=8, dtype="float16")
    plain = load_adapter(write_adapter(ad, tmp_path / "plain", "peft"))
    st5 = load_adapter(_minilm_peft(tmp_path, "st5", "0.auto_model.", ad))
    st6 = load_adapter(_minilm_peft(tmp_path, "st6", "0.model.", ad))
    assert plain.family == st5.family == st6.family == "minilm"
    assert [m.name for m in st6.modules] == [m.name for m in plain.modules]
    assert relative_difference(plain, st6) < 1e-12


def test_bare_peft_oft_file_is_refused_as_oft(tmp_path):
    sd = {f"base_model.model.encoder.layer.{i}.attention.self.query.oft_R.weight": t(24, 16 * 17 // 2)
          for i in range(2)}
    save_file(sd, str(tmp_path / "oft.safetensors"))
    refused(tmp_path / "oft.safetensors", "OFT", "x2 modules")


def test_kohya_named_minilm_gets_the_peft_family_and_names(tmp_path):
    ad = random_adapter("minilm", rank=4, targets=r"(attention\.self\.query|intermediate\.dense|output\.dense)$",
                        seed=11, alpha=2, dtype="float16")
    peft = load_adapter(write_adapter(ad, tmp_path / "p", "peft"))
    sd = {}
    for m in ad.modules:
        stem = "lora_te_" + m.name.replace(".", "_")
        sd[f"{stem}.lora_down.weight"] = torch.from_numpy(m.A.copy())
        sd[f"{stem}.lora_up.weight"] = torch.from_numpy(m.B.copy())
        sd[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(tmp_path / "k.safetensors"))
    k = load_adapter(tmp_path / "k.safetensors")
    assert k.family == peft.family == "minilm"
    assert [(m.name, m.scale, m.shape) for m in k.modules] == [(m.name, m.scale, m.shape) for m in peft.modules]
    assert not k.warnings and relative_difference(peft, k) < 1e-6


def test_bare_peft_file_without_config_has_scale_unknown(tmp_path):
    ad = random_adapter("minilm", rank=4, targets=r"attention\.self\.value", seed=12, alpha=16)
    folder = load_adapter(write_adapter(ad, tmp_path / "f", "peft"))
    bare = load_adapter(write_adapter(ad, tmp_path / "bare.safetensors", "peft-file"))
    # the bare file as peft itself leaves it: the folder's adapter_model.safetensors copied out alone
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes((tmp_path / "f" / "adapter_model.safetensors").read_bytes())
    alone_ad = load_adapter(alone)
    assert folder.scale_known and describe(folder)["scale_known"] is True
    assert not alone_ad.scale_known and describe(alone_ad)["scale_known"] is False
    assert delta_cosine(folder, alone_ad) == pytest.approx(1.0, abs=1e-9)
    assert bare.scale_known is False      # peft-file keys, no config: the writer folded the scale, the reader can't know
    assert delta_cosine(folder, bare) == pytest.approx(1.0, abs=1e-6)


# ---- found by the fuzz harness / by reading the code for super-linear paths -----------------------
def test_kohya_name_with_thousands_of_underscores_is_read_in_linear_time(tmp_path):
    stem = "lora_unet_" + "a_" * 30000 + "b"      # the dot-restoring heuristic was O(n³) in the pieces
    save_file({f"{stem}.lora_down.weight": t(2, 8), f"{stem}.lora_up.weight": t(8, 2)}, str(tmp_path / "u.safetensors"))
    out = _load_in_child(tmp_path / "u.safetensors", timeout=60)
    assert out.startswith("OK")
    ad = load_adapter(tmp_path / "u.safetensors")
    assert max(len(w) for w in ad.warnings) < 1000        # warnings quote names shortened


def test_locon_mid_whose_product_would_be_huge_is_refused(tmp_path):
    n = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({f"{n}.lora_down.weight": t(2, 20000, 1, 1), f"{n}.lora_mid.weight": t(2, 2, 200, 200),
               f"{n}.lora_up.weight": t(320, 2, 1, 1)}, str(tmp_path / "m.safetensors"))
    refused(tmp_path / "m.safetensors", "lora_mid", "kernel")
