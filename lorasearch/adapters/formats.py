"""The key grammar: split every tensor key into (module, role) and name the layout it belongs to.

One suffix table covers every B·A layout (research notes §9 step 3), longest suffix first:

=================  =====================================================  =======================
layout             suffixes                                               module names
=================  =====================================================  =======================
kohya              ``.lora_down.weight .lora_up.weight .lora_mid.weight``  ``lora_unet_…``, ``lora_te…_``
                   ``.alpha``                                             (dots became ``_``)
peft / diffusers   ``.lora_A[.<adapter>].weight .lora_B[…].weight``       ``base_model.model.<path>`` /
                   ``.lora_A .lora_B .lora_embedding_A/_B``               ``unet.`` ``text_encoder.`` …
diffusers-mid      ``.lora.down.weight .lora_linear_layer.down.weight``   ``unet.<path>``
diffusers-old      ``.processor.to_q_lora.down.weight`` …                 ``<path>`` (no prefix)
xlabs (Flux)       ``.processor.qkv_lora1.down.weight`` ``….up.weight``   ``double_blocks.N`` …
=================  =====================================================  =======================

Flux/SD3 names in BFL/SAI form (kohya, ``diffusion_model.``, XLabs, fal) are turned into diffusers names
after reading, fused modules split exactly (``dit.py``).

Keys of non-B·A algorithms (LyCORIS LoHa, LoKr, IA3, OFT/BOFT, GLoRA, full/diff, norm) are recognised
so they can be refused by name; anything else is an *unknown key*, reported, never silently dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .dit import KOHYA_TOP, known_bfl, known_dit, xlabs_to_bfl
from .names import diffusers_from_sgm, kohya_to_normalized, normalize_path, table_names

# role: A / B / mid / alpha / embA / embB / dora / bias
_SUFFIXES = (
    (".lora_linear_layer.down.weight", "A", "diffusers-mid"), (".lora_linear_layer.up.weight", "B", "diffusers-mid"),
    (".lora.down.weight", "A", "diffusers-mid"), (".lora.up.weight", "B", "diffusers-mid"),
    ("_lora.down.weight", "A", "diffusers-old"), ("_lora.up.weight", "B", "diffusers-old"),
    (".lora_down.weight", "A", "kohya"), (".lora_up.weight", "B", "kohya"), (".lora_mid.weight", "mid", "kohya"),
    (".lora_A.weight", "A", "peft"), (".lora_B.weight", "B", "peft"), (".lora_B.bias", "bias", "peft"),
    (".lora_embedding_A", "embA", "peft"), (".lora_embedding_B", "embB", "peft"),
    (".lora_magnitude_vector", "dora", "peft"), (".lora_magnitude_vector.weight", "dora", "peft"),
    (".dora_scale", "dora", "kohya"),
    (".lora_A", "A", "peft"), (".lora_B", "B", "peft"),
    (".alpha", "alpha", "any"),
)
_ADAPTER_NAMED = re.compile(r"^(.+)\.lora_(A|B)\.([A-Za-z0-9_\-]+)\.weight$")
# XLabs Flux: ``double_blocks.0.processor.qkv_lora1.down.weight`` (before the diffusers-old ``_lora.down``)
_XLABS_KEY = re.compile(r"^((?:[\w.]*\.)?(?:double|single)_blocks\.\d+\.processor\.\w+)\.(down|up)\.weight$")

# LyCORIS and other algorithms that are not B·A: suffix → algorithm name
_FOREIGN = (
    (re.compile(r"\.hada_(w[12]_[ab]|t[12])$"), "LoHa (Hadamard product, rank up to r^2)"),
    (re.compile(r"\.lokr_(w[12](_[ab])?|t2)$"), "LoKr (Kronecker product)"),
    (re.compile(r"\.oft_(blocks|R|s)(\.weight)?$"), "OFT/BOFT (orthogonal, multiplicative)"),    # peft ≥0.15: oft_R.weight
    (re.compile(r"\.(boft_R|boft_s)(\.weight)?$"), "BOFT (orthogonal, multiplicative)"),
    (re.compile(r"\.(a1|a2|b1|b2|bm)\.weight$"), "GLoRA"),
    (re.compile(r"\.diff(_b)?$"), "full/diff (dense weight delta)"),
    (re.compile(r"\.(w_norm|b_norm)$"), "norm (normalization-layer delta)"),
    (re.compile(r"\.on_input$"), "IA3 (multiplicative scaling vector)"),
    (re.compile(r"\.ia3_l$"), "IA3 (multiplicative scaling vector)"),
    (re.compile(r"\.(vera_lambda_[bd]|lora_E)$"), "VeRA/AdaLoRA"),
)


@dataclass
class KeyPart:
    key: str
    stem: str        # the module part of the key as written in the file
    role: str
    layout: str


def classify(key: str) -> KeyPart | None:
    """(stem, role, layout) for a LoRA key, or None for a key no B·A layout explains."""
    m = _ADAPTER_NAMED.match(key)
    if m and m.group(3) != "weight":
        return KeyPart(key, m.group(1), m.group(2), "peft")
    m = _XLABS_KEY.match(key)
    if m:
        return KeyPart(key, m.group(1), "A" if m.group(2) == "down" else "B", "xlabs")
    for suffix, role, layout in _SUFFIXES:
        if key.endswith(suffix):
            return KeyPart(key, key[: -len(suffix)], role, layout)
    return None


def foreign_algorithm(key: str) -> str | None:
    for rx, algo in _FOREIGN:
        if rx.search(key):
            return algo
    return None


def foreign_stem(key: str) -> str:
    for rx, _ in _FOREIGN:
        m = rx.search(key)
        if m:
            return key[: m.start()]
    return key


_OLD_PROC = re.compile(r"\.(attn[12]|self_attn)\.(?:processor\.)?(to_q|to_k|to_v|to_out)$")
_OLD_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


# transformers ≥ 5 dropped CLIPTextModel's ``text_model.`` level: diffusers now writes
# ``text_encoder.encoder.layers.0…`` where older files and kohya have ``text_encoder.text_model.encoder…``
_CLIP_V5 = re.compile(r"^(text_encoder(?:_2)?)\.(?=(?:encoder\.layers\.\d|embeddings\.(?:token|position)_embedding\b|final_layer_norm))")
# a BERT-style encoder (MiniLM, BERT …) under kohya's text-encoder prefix: the model's own path, no component
_BERT_PATH = re.compile(r"^text_encoder\.(?=(?:encoder\.layer\.\d+|embeddings|pooler)\.)")
_BERT_KNOWN = re.compile(r"^(encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                         r"intermediate\.dense|output\.dense)|embeddings\.(word|position|token_type)_embeddings|"
                         r"pooler\.dense)$")
# DiffSynth-Studio writes Flux (diffusers names) without the ``transformer.`` component
_BARE_DIT = re.compile(r"^((single_)?transformer_blocks\.\d+\.|x_embedder$|context_embedder$|time_text_embed\.|"
                       r"norm_out\.linear$)")


def normalize_stem(stem: str, layout: str) -> tuple[str, str]:
    """File stem → (normalized module name, naming scheme). The scheme is ``kohya`` (or
    ``kohya-heuristic`` when no architecture table knew the name), ``peft`` (``base_model.model.``),
    ``diffusers`` (component prefix), ``attn-procs`` or ``plain``. One module gets one name whichever
    producer (and library version) wrote it; see :data:`_CLIP_V5`, :data:`_BERT_PATH`, :data:`_BARE_DIT`."""
    name, scheme = _normalize_stem(stem, layout)
    clip = _CLIP_V5.sub(r"\1.text_model.", name)
    if clip != name:
        name = clip
        if scheme == "kohya-heuristic" and name in table_names():
            scheme = "kohya"      # a transformers-5 name of a module the tables know
    if _BERT_PATH.match(name):
        name = name[len("text_encoder."):]
        if scheme == "kohya-heuristic" and _BERT_KNOWN.match(name):
            scheme = "kohya"      # BERT's path grammar is unambiguous once split: not a guess
    return name, scheme


def _normalize_stem(stem: str, layout: str) -> tuple[str, str]:
    if layout == "diffusers-old":
        m = _OLD_PROC.search(stem)
        if m:
            head = stem[: m.start()]
            if m.group(1) == "self_attn":
                stem = f"{head}.self_attn.{_OLD_TE[m.group(2)]}"
            else:
                stem = f"{head}.{m.group(1)}.{'to_out.0' if m.group(2) == 'to_out' else m.group(2)}"
    if stem.startswith("lora_unet_") and stem[len("lora_unet_"):] in KOHYA_TOP:     # Flux embedders/final layer
        return f"transformer.{KOHYA_TOP[stem[len('lora_unet_'):]]}", "kohya"
    if "." not in stem and re.match(r"(lora_|lycoris_)", stem):
        name, known, _ = kohya_to_normalized(stem)
        known = known or known_bfl(name) or known_dit(name) or name.startswith("transformer.joint_blocks.")
        return name, ("kohya" if known else "kohya-heuristic")
    scheme = "plain"
    if stem.startswith("base_model.model."):
        stem, scheme = stem[len("base_model.model."):], "peft"
    xl = xlabs_to_bfl(stem)
    if xl:
        return xl, "xlabs"
    if re.match(r"(double_blocks|single_blocks|joint_blocks)\.\d+\.", stem):     # fal / bare BFL names
        return f"transformer.{stem}", scheme
    if stem.startswith("diffusion_model."):
        rest = stem[len("diffusion_model."):]
        if rest in KOHYA_TOP.values():
            return f"transformer.{rest}", "diffusers"
        if re.match(r"(double_blocks|single_blocks|joint_blocks)\.", rest):
            return f"transformer.{rest}", "diffusers"
        return f"unet.{diffusers_from_sgm(rest)}", "diffusers"
    for src, dst in (("text_encoders.clip_l.transformer.", "text_encoder."),
                     ("text_encoders.clip_g.transformer.", "text_encoder_2."),
                     ("text_encoders.t5xxl.transformer.", "text_encoder_3.")):
        if stem.startswith(src):
            return dst + stem[len(src):], "diffusers"
    if re.match(r"transformer\.h\.\d+\.", stem):      # GPT-2 style LMs, not a diffusion transformer
        return normalize_path(stem), scheme
    if re.match(r"(unet|text_encoder(_2|_3)?|transformer|prior)\.", stem):
        return stem, ("diffusers" if scheme == "plain" else scheme)
    if re.match(r"(down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding)\.", stem):
        return f"unet.{stem}", (scheme if scheme == "peft" else "attn-procs")
    if stem.startswith("text_model."):        # PEFT on a bare CLIPTextModel
        return f"text_encoder.{stem}", scheme
    if _BARE_DIT.match(stem):
        return f"transformer.{stem}", scheme
    return normalize_path(stem), scheme
