"""Which base model an adapter applies to, from metadata, module paths and shapes.

The family decides which adapters are compared, so it must depend on the base model only, never on
which modules an adapter happens to target or on its rank: every rule below reads a *dimension of the
base model* (hidden size, cross-attention width, layer layout) that any targeted module reveals.
Order (research notes §8): ``modelspec.architecture`` → ``ss_base_model_version``/``ss_v2`` →
key structure → shapes.

Language models: every decoder whose layers are ``layers.N.`` (Llama, Mistral, Qwen2, Gemma, Phi-3 …,
after ``base_model.model.model.`` is stripped) is ``llama-h{H}`` with H the hidden size, the one base
dimension that *every* targeted linear reveals (in-dim of q/k/v/qkv/gate/up, out-dim of o/down). The KV
width (GQA) shows only on k/v and the MLP width only on the MLP, so adding them would put a q,v adapter
and an all-linear adapter of the same base in different families; they are not used. Different bases of
one hidden size share a family (Llama-2-7B, Llama-3-8B and Mistral-7B are all ``llama-h4096``; Phi-3-mini
and Gemma-7B ``llama-h3072``): their module names and shapes differ where the models differ, so a
comparison only ever pairs weights of one shape. GPT-2 style (``h.N.``, Conv1D): ``gpt2-h{H}``.
Diffusion: ``sd1``/``sd2``/``sdxl`` (cross-attention width), ``sd3`` (SD3/3.5 Medium, hidden 1536),
``sd3.5-large`` (2432), ``flux`` (Flux.1, 3072; Flux-style blocks of other widths ``flux-h{H}``, other
diffusers DiTs ``dit-h{H}``).
"""
from __future__ import annotations

import re
from collections import Counter

from ..types import LoraModule

_MODELSPEC = (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v1", "sd1"), ("stable-diffusion-v2", "sd2"),
              ("stable-diffusion-3", "sd3"), ("flux", "flux"))
_SS_VERSION = (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"), ("sd3", "sd3"), ("flux", "flux"))


def family_from_metadata(meta: dict[str, str]) -> str | None:
    arch = meta.get("modelspec.architecture", "").lower()
    for prefix, fam in _MODELSPEC:
        if arch.startswith(prefix):
            return fam
    ver = meta.get("ss_base_model_version", "").lower()
    for prefix, fam in _SS_VERSION:
        if ver.startswith(prefix):
            return fam
    if meta.get("ss_v2") == "True":       # older kohya files: only the v2 flag
        return "sd2"
    return None


def _in(m: LoraModule) -> int:
    return int(m.shape[1]) if len(m.shape) >= 2 else m.in_features


def _out(m: LoraModule) -> int:
    return int(m.shape[0]) if m.shape else m.out_features


def infer_family(modules: list[LoraModule], meta: dict[str, str] | None = None,
                 hints: set[str] | None = None, notes: list[str] | None = None) -> str:
    """``sd1``/``sd2``/``sdxl``/``sd3``/``flux``/``minilm``/``bert-h{H}``/``llama-h{H}``/… for ``modules``.

    ``hints`` are facts the parser saw that names lose (``"kohya-te1"``: a ``lora_te1_`` prefix, which
    kohya writes for SDXL but diffusers' ``convert_state_dict_to_kohya`` also writes for SD1.5, so it only
    breaks a tie). When the modules fit more than one base model a sentence saying so is appended to
    ``notes``.
    """
    notes = notes if notes is not None else []
    fam = family_from_metadata(meta or {})
    if fam and fam != "sd3":
        return fam
    hints = hints or set()
    flux = [m for m in modules if re.search(r"(^|\.)(double_blocks|single_blocks|single_transformer_blocks)\.", m.name)]
    if fam is None and flux:       # Flux.1 is 3072 wide; Flux.2-style DiTs of other widths get their own family
        h = Counter(min(_in(m), _out(m)) for m in flux).most_common(1)[0][0]
        return "flux" if h == 3072 else f"flux-h{h}"
    joint = [m for m in modules if re.search(r"(^|\.)joint_blocks\.", m.name)]
    if joint:      # SD3 kohya names: the hidden size is the smaller side of every block linear
        h = Counter(min(_in(m), _out(m)) for m in joint).most_common(1)[0][0]
        return "sd3.5-large" if h == 2432 else "sd3"
    if fam:        # "sd3" from metadata: SD3.5 Large is told apart by its width below
        dit = [m for m in modules if m.name.startswith("transformer.transformer_blocks.")]
        big = any(_in(m) == 2432 or _out(m) == 2432 for m in dit)
        return "sd3.5-large" if big else fam
    unet = [m for m in modules if m.name.startswith("unet.")]
    te = [m for m in modules if m.name.startswith("text_encoder")]
    dit = [m for m in modules if m.name.startswith("transformer.transformer_blocks.")]
    if unet or te:
        return _sd_family(unet, te, hints, notes)
    if dit:
        hidden = Counter(_out(m) for m in dit if m.name.endswith((".to_q", ".to_k", ".to_v"))).most_common(1)
        h = hidden[0][0] if hidden else Counter(_in(m) for m in dit).most_common(1)[0][0]
        return {3072: "flux", 1536: "sd3", 2432: "sd3.5-large"}.get(h, f"dit-h{h}")
    bert = [m for m in modules if re.match(r"((encoder|transformer)\.layer\.\d+|embeddings)\.", m.name)]
    if bert:
        h = _hidden(bert, r"\.(query|key|value|q_lin|k_lin|v_lin)$", r"\.attention\.output\.dense$|\.out_lin$",
                    r"\.intermediate\.dense$|\.ffn\.lin1$|^embeddings\.", r"\.output\.dense$|\.ffn\.lin2$")
        layers = max((int(x.group(1)) for m in bert if (x := re.match(r"\w+\.layer\.(\d+)\.", m.name))),
                     default=0) + 1
        return "minilm" if h == 384 and layers <= 6 else f"bert-h{h}"
    # decoder layers, also inside a multimodal wrapper (Llava ``language_model.model.``, Qwen2-VL / Gemma-3
    # ``model.language_model.``); a LoRA on the vision tower does not change the family
    llm = [m for m in modules
           if re.match(r"(decoder\.|language_model\.(model\.)?|model\.language_model\.)?layers\.\d+\.", m.name)]
    if llm:
        h = _hidden(llm, r"\.(q_proj|k_proj|v_proj|qkv_proj)$", r"\.o_proj$", r"\.(gate_proj|up_proj|gate_up_proj)$",
                    r"\.down_proj$")
        return f"llama-h{h}"
    gpt = [m for m in modules if re.match(r"h\.\d+\.", m.name)]
    if gpt:
        h = Counter(min(m.out_features, m.in_features) for m in gpt).most_common(1)[0][0]
        return f"gpt2-h{h}"
    root = modules[0].name.split(".")[0] if modules else "empty"
    # the smaller side of a transformer linear is the hidden size for q/o/MLP/fused-qkv alike, so the
    # family does not move with which modules are targeted (the in-dim would: MLP-down has in = 4·H)
    h = Counter(min(m.out_features, m.in_features) for m in modules).most_common(1)[0][0] if modules else 0
    return f"generic-{root}-h{h}"


def _hidden(mods, in_rx, out_rx, in2_rx, out2_rx) -> int:
    """Hidden size: the in-dim of q/k/v or MLP-up, or the out-dim of attn-out or MLP-down."""
    for m in mods:
        if re.search(in_rx, m.name) or re.search(in2_rx, m.name):
            return _in(m)
        if re.search(out_rx, m.name) or re.search(out2_rx, m.name):
            return _out(m)
    return Counter(_in(m) for m in mods).most_common(1)[0][0]


# (width, has attentions) per down/up block, and whether proj_in/proj_out are 1x1 convs
_LAYOUTS = {
    "sd1": ({"down": [(320, 1), (640, 1), (1280, 1), (1280, 0)], "up": [(1280, 0), (1280, 1), (640, 1), (320, 1)],
             "mid": [(1280, 1)]}, True, 1),
    "sdxl": ({"down": [(320, 0), (640, 1), (1280, 1)], "up": [(1280, 1), (640, 1), (320, 0)],
              "mid": [(1280, 1)]}, False, 10),
    "sd2": ({"down": [(320, 1), (640, 1), (1280, 1), (1280, 0)], "up": [(1280, 0), (1280, 1), (640, 1), (320, 1)],
             "mid": [(1280, 1)]}, False, 1),
}
_BLOCK = re.compile(r"^unet\.(down|up|mid)_blocks?\.(?:(\d+)\.)?(attentions|resnets|downsamplers|upsamplers)\.\d+\."
                    r"(?:transformer_blocks\.(\d+)\.)?")


def _fits(layout, m: LoraModule) -> bool:
    blocks, conv_proj, max_tb = layout
    hit = _BLOCK.match(m.name)
    if not hit:
        return True
    kind, idx, sub, tb = hit.group(1), int(hit.group(2) or 0), hit.group(3), hit.group(4)
    if idx >= len(blocks[kind]):
        return False
    width, attn = blocks[kind][idx]
    if sub == "attentions":
        if not attn or (tb is not None and int(tb) >= max_tb):
            return False
        if m.name.endswith((".proj_in", ".proj_out")) and (len(m.shape) == 4) != conv_proj:
            return False
    return _out(m) in (width, 8 * width)


def _sd_family(unet: list[LoraModule], te: list[LoraModule], hints: set[str], notes: list[str]) -> str:
    """The UNet decides first (cross-attention width, else its block layout); the text encoders only
    narrow what the UNet leaves open. A file with CLIP-L modules only is ambiguous: SD1.x's text encoder
    and SDXL's first one are the same model."""
    for m in unet:   # cross-attention context width: 768 SD1, 1024 SD2, 2048 SDXL (InvokeAI lora_token_vector_length)
        if re.search(r"\.attn2\.(to_k|to_v)$", m.name):
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(_in(m), f"sd-ctx{_in(m)}")
    cands = [fam for fam, layout in _LAYOUTS.items() if all(_fits(layout, m) for m in unet)] if unet else None
    if unet and not cands:
        return "sd-unet"
    te_fams = None
    if any(m.name.startswith("text_encoder_2.") for m in te):
        te_fams = ["sdxl"]
    else:
        for m in te:   # CLIP-L (SD1, SDXL's first encoder) is 768 wide, OpenCLIP-H (SD2) 1024
            w = _in(m) if m.name.endswith(("q_proj", "k_proj", "v_proj", "fc1")) else _out(m)
            te_fams = {768: ["sd1", "sdxl"], 1024: ["sd2"]}.get(w, [f"sd-te{w}"])
            break
    if cands is None:          # text encoders only
        fams = te_fams or ["sd-te"]
    else:
        fams = [f for f in cands if te_fams is None or f in te_fams] or cands
    if "kohya-te1" in hints and "sdxl" in fams:    # only breaks a tie: kohya names SDXL's encoders te1/te2
        fams = ["sdxl"] + [f for f in fams if f != "sdxl"]
    if len(fams) > 1:
        notes.append(f"family ambiguous: the adapted modules fit {' and '.join(fams)} "
                     f"({'text encoder only' if not unet else 'no layer that tells them apart'}); "
                     f"read as {fams[0]}")
    return fams[0]
