"""Module names: the architecture tables, kohya's lossy ``.``→``_`` names, SDXL's SGM numbering.

Every reader maps its keys to one *normalized* name per adapted weight, the module's path in the
diffusers / transformers base model (``unet.down_blocks.0.attentions.0.proj_in``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``encoder.layer.0.attention.self.query``),
so the same module gets the same name whatever file format it came from.

kohya writes ``lora_unet_down_blocks_0_attentions_0_proj_in``: every ``.`` became ``_`` and the module
path cannot be read back from the string alone. We undo it with the tables in ``archs/*.json``
(generated once from the real models, see ``archs/generate.py``); names no table knows are split by a
documented heuristic (:func:`heuristic_dots`) and the reader warns.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

ARCH_DIR = Path(__file__).parent / "archs"
ARCHS = ("sd15", "sd2", "sdxl", "minilm")

# kohya prefix -> normalized component prefix ("" = the name is the base model's own path)
KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("lora_transformer_", "transformer"),
    ("lora_prior_unet_", "prior"),
    ("lora_prior_te_", "text_encoder"),
    ("lycoris_", "unet"),
)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")

# path components that contain "_" in base models no table covers (DiTs, LLMs, SGM UNets)
EXTRA_WORDS = {
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb", "double_blocks", "single_blocks", "img_attn",
    "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "joint_blocks", "x_block",
    "context_block", "adaLN_modulation", "single_transformer_blocks", "transformer_blocks",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "norm1_context",
    "proj_mlp", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj",
    "up_proj", "down_proj", "embed_tokens", "lm_head", "c_attn", "c_proj", "c_fc", "qkv_proj",
    "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h", "query_key_value", "text_model",
    "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "time_emb_proj", "conv_shortcut",
    "down_blocks", "up_blocks", "mid_block", "block_sparse_moe", "word_embeddings",
}


@lru_cache(maxsize=None)
def arch_table(arch: str) -> dict:
    """``{"arch", "family", "modules": [[name, shape]…], "conv": [[name, shape]…]}`` for one architecture."""
    path = ARCH_DIR / f"{arch}.json"
    if not path.is_file():
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return json.loads(path.read_text())


@lru_cache(maxsize=None)
def _words() -> frozenset[str]:
    words = set(EXTRA_WORDS)
    for arch in ARCHS:
        t = arch_table(arch)
        for name, _ in t["modules"] + t["conv"]:
            words.update(p for p in name.split(".") if "_" in p)
    return frozenset(words)


@lru_cache(maxsize=None)
def _longest_word() -> int:
    return max(w.count("_") + 1 for w in _words())


def heuristic_dots(underscored: str) -> str:
    """Turn ``a_b_c`` back into a dotted path by greedy longest match against known path words.

    The heuristic: split at every ``_``; at each position take the longest run of pieces that
    joins (with ``_``) into a known compound word (``transformer_blocks``, ``q_proj`` …, from the
    architecture tables and :data:`EXTRA_WORDS`), else a single piece; join the results with ``.``.
    """
    pieces = underscored.split("_")
    words = _words()
    longest = _longest_word()
    out, i = [], 0
    while i < len(pieces):      # a compound word has at most `longest` pieces: O(len · longest), never O(len²)
        for j in range(min(len(pieces), i + longest), i + 1, -1):
            cand = "_".join(pieces[i:j])
            if cand in words:
                out.append(cand)
                i = j
                break
        else:
            out.append(pieces[i])
            i += 1
    return ".".join(out)


# ---- SDXL: SGM (ldm) numbering <-> diffusers numbering, layers_per_block = 2 -------------------
_SDXL_UP_HAS_ATTN = (True, True, False)
_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_RESNET_DIFF = {v: k for k, v in _RESNET_SGM.items()}
_TOP_SGM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
_TOP_DIFF = {v: k for k, v in _TOP_SGM.items()}


def _swap_prefix(path: str, table: dict[str, str]) -> str | None:
    """``path`` with its leading component(s) replaced through ``table``, or None if none matches."""
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return None


def sgm_from_diffusers(path: str) -> str:
    """``down_blocks.1.attentions.0.proj_in`` → ``input_blocks.4.1.proj_in`` (SDXL UNet, no ``unet.``)."""
    top = _swap_prefix(path, _TOP_SGM)
    if top is not None:
        return top
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", path)
    if m:
        kind, b, sub, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if sub == "resnets":
            rest = _resnet_rest(rest, _RESNET_SGM)
        if kind == "down_blocks":
            if sub == "downsamplers":
                return f"input_blocks.{3 * b + 3}.0.op" + rest[len("conv"):]
            return f"input_blocks.{3 * b + 1 + j}.{0 if sub == 'resnets' else 1}.{rest}"
        if sub == "upsamplers":
            return f"output_blocks.{3 * b + 2}.{2 if _SDXL_UP_HAS_ATTN[b] else 1}.{rest}"
        return f"output_blocks.{3 * b + j}.{0 if sub == 'resnets' else 1}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        sub, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if sub == "resnets":
            return f"middle_block.{2 * j}.{_resnet_rest(rest, _RESNET_SGM)}"
        return f"middle_block.1.{rest}"
    return path


def diffusers_from_sgm(path: str) -> str:
    """Inverse of :func:`sgm_from_diffusers`; paths that are not SGM pass through unchanged."""
    top = _swap_prefix(path, _TOP_DIFF)
    if top is not None:
        return top
    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if m:
        i, inner, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        b, j = (i - 1) // 3, (i - 1) % 3
        if j == 2 or rest.startswith("op"):
            return f"down_blocks.{b}.downsamplers.0.conv" + rest[len("op"):]
        if inner == 0:
            return f"down_blocks.{b}.resnets.{j}.{_resnet_rest(rest, _RESNET_DIFF)}"
        return f"down_blocks.{b}.attentions.{j}.{rest}"
    m = re.match(r"middle_block\.(\d+)\.(.+)$", path)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        if k == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{k // 2}.{_resnet_rest(rest, _RESNET_DIFF)}"
    m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if m:
        i, inner, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        b, j = i // 3, i % 3
        if inner == 0:
            return f"up_blocks.{b}.resnets.{j}.{_resnet_rest(rest, _RESNET_DIFF)}"
        if rest.startswith("conv") and (inner == 2 or not _SDXL_UP_HAS_ATTN[min(b, 2)]):
            return f"up_blocks.{b}.upsamplers.0.{rest}"
        return f"up_blocks.{b}.attentions.{j}.{rest}"
    return path


def _resnet_rest(rest: str, table: dict) -> str:
    for a, b in table.items():
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


# ---- kohya names ------------------------------------------------------------------------------
def kohya_prefix(component: str, sdxl: bool) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if sdxl else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te2_"
    if component == "text_encoder_3":
        return "lora_te3_"
    if component == "transformer":
        return "lora_unet_"
    raise ValueError(f"kohya format has no prefix for component {component!r}")


def split_component(name: str) -> tuple[str, str]:
    """``unet.down_blocks.0…`` → (``unet``, ``down_blocks.0…``); no known component → ("", name)."""
    head, _, rest = name.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return "", name


def kohya_name(name: str, sdxl: bool = False) -> str:
    """The kohya module name (no ``.lora_down.weight``) for a normalized module name."""
    comp, path = split_component(name)
    if not comp:
        raise ValueError(f"kohya format cannot name module {name!r} (no unet./text_encoder. prefix)")
    if comp == "unet" and sdxl:
        path = sgm_from_diffusers(path)
    return kohya_prefix(comp, sdxl) + path.replace(".", "_")


@lru_cache(maxsize=None)
def _kohya_lookup() -> dict[tuple[str, str], str]:
    """(component, underscored path) → dotted diffusers path, from every table (SGM forms for SDXL)."""
    table: dict[tuple[str, str], str] = {}
    for arch in ARCHS:
        t = arch_table(arch)
        for name, _ in t["modules"] + t["conv"]:
            comp, path = split_component(name)
            if not comp:
                continue
            table[(comp, path.replace(".", "_"))] = path
            if arch == "sdxl" and comp == "unet":
                table[(comp, sgm_from_diffusers(path).replace(".", "_"))] = path
    return table


@lru_cache(maxsize=None)
def table_names() -> frozenset[str]:
    """Every normalized module name the architecture tables know."""
    return frozenset(name for arch in ARCHS for name, _ in arch_table(arch)["modules"] + arch_table(arch)["conv"])


def kohya_to_normalized(module: str) -> tuple[str, bool, str]:
    """kohya module name → (normalized name, found in a table?, kohya prefix used)."""
    for prefix, comp in KOHYA_PREFIXES:
        if module.startswith(prefix):
            rest = module[len(prefix):]
            break
    else:
        return normalize_path(heuristic_dots(module)), False, ""
    if comp == "unet" and re.match(r"(double_blocks|single_blocks|joint_blocks|single_transformer_blocks|"
                                   r"transformer_blocks)_", rest):
        comp = "transformer"     # Flux / SD3 kohya files reuse lora_unet_ for the DiT
    hit = _kohya_lookup().get(("unet" if comp == "prior" else comp, rest))
    if hit is not None:
        return f"{comp}.{hit}", True, prefix
    path = heuristic_dots(rest)
    if comp == "unet":
        path = diffusers_from_sgm(path)
    return f"{comp}.{path}", False, prefix


# ---- wrappers -----------------------------------------------------------------------------------
_TASK_WRAPPER = re.compile(
    r"^(?:bert|roberta|distilbert|deberta|electra|albert|mpnet|xlm_roberta|camembert|auto_model|"
    r"0\.auto_model|0\.model)\.(?=(?:encoder|embeddings|transformer|pooler)\.)")    # sentence-transformers ≥ 6: 0.model.
_LLM_WRAPPER = re.compile(r"^(?:model\.(?=layers\.\d)|model\.(?=decoder\.layers\.\d)|transformer\.(?=h\.\d)|"
                          r"model\.language_model\.(?=layers\.\d)|language_model\.model\.(?=layers\.\d))")


def normalize_path(name: str) -> str:
    """Strip task wrappers so an adapter on ``BertModel`` and on ``BertForSequenceClassification``
    (``bert.encoder…``), or on ``LlamaModel`` and ``LlamaForCausalLM`` (``model.layers…``), compare; the
    language model inside a multimodal wrapper (``language_model.model.layers…`` in Llava and older
    transformers, ``model.language_model.layers…`` in Qwen2-VL / Gemma-3 since transformers 4.52) gets
    the names of the text-only model."""
    name = _TASK_WRAPPER.sub("", name)
    return _LLM_WRAPPER.sub("", name)
