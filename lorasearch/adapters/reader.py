"""``load_adapter(path)``: any supported LoRA file or PEFT folder → :class:`LoraAdapter`.

Steps (research notes §9): input kind (PEFT folder / pickle / GGUF / safetensors) → strict
safetensors parse → split keys by the suffix grammar (``formats.py``) → refuse non-B·A algorithms
→ pair A with B per module, fold LoCon ``lora_mid`` → alpha by priority → validate → family.

Alpha priority, per module: a ``.alpha`` tensor → the PEFT ``adapter_config.json`` (``lora_alpha``,
``alpha_pattern``, ``use_rslora``) → diffusers ``lora_adapter_metadata`` in the header (component
prefixed) → alpha = rank. ``ss_network_alpha`` is never used per module (it is only a default).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..errors import BadAdapterError, MissingError
from ..types import LoraAdapter, LoraModule
from .family import infer_family
from .dit import split_fused
from .formats import classify, foreign_algorithm, foreign_stem, normalize_stem
from .names import split_component
from .patterns import AlphaConfig, truthy as _truthy
from .safetensors_strict import (HEADER_CAP, SafetensorsFile, loads_limited, open_regular, open_safetensors,
                                 read_head, refuse_sniffed, short, sniff)

log = logging.getLogger("lorasearch.adapters")
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
CHUNK = 1 << 20
MAX_FACTOR = 1 << 28        # values in one unfolded LoCon factor (1 GiB of float32); real ones are < 10^7
_DORA_KEYS = (".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".dora_scale")


# ---- hashing ---------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:      # never a FIFO/device: refused, not opened
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def adapter_sha256(path) -> str:
    """sha256 of the file bytes. For a PEFT folder: sha256 of the text
    ``"peft\\n<sha256 of adapter_model.safetensors>\\n<sha256 of adapter_config.json>\\n"``, so it changes
    when either the weights or the config (alpha, rsLoRA…) change."""
    path = Path(path)
    if path.is_dir():
        w, c = path / "adapter_model.safetensors", path / "adapter_config.json"
        parts = [_sha256_file(w) if w.is_file() else "-", _sha256_file(c) if c.is_file() else "-"]
        return hashlib.sha256(("peft\n" + "\n".join(parts) + "\n").encode()).hexdigest()
    if not path.exists():
        raise MissingError(f"{path}: no such file or folder")
    return _sha256_file(path)


# ---- discovery -------------------------------------------------------------------------------
ADAPTER_SUFFIXES = (".safetensors", ".gguf") + PICKLE_SUFFIXES


def find_adapters(root) -> list[Path]:
    """Every adapter under ``root``, sorted: PEFT folders (a folder with ``adapter_config.json``, listed
    once, its ``adapter_model.*`` not again), loose ``.safetensors`` files, and pickles/GGUF files so the
    caller can report them as refused. Follows symlinks, each real folder visited once; skips hidden
    folders (``.lorasearch`` …)."""
    root = Path(root)
    if not root.exists():
        raise MissingError(f"{root}: no such file or folder")
    if not root.is_dir():      # a file, or a FIFO/socket/device named like one: listed so the caller reports it
        return [root] if root.suffix.lower() in ADAPTER_SUFFIXES else []
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        is_peft = (d / "adapter_config.json").is_file()
        if is_peft:
            found.append(d)
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    stack.append(e)
                elif e.suffix.lower() in ADAPTER_SUFFIXES and e.exists():     # FIFOs etc. too: reported, never opened
                    if not (is_peft and e.name.startswith("adapter_model.")):
                        found.append(e)
            except OSError:
                continue
    return sorted(found, key=str)


# ---- loading ---------------------------------------------------------------------------------
def load_adapter(path, sha256: str | None = None, check_finite: bool = True) -> LoraAdapter:
    """Read a LoRA file or PEFT folder. Raises :class:`BadAdapterError` (exit 65) with a one-line
    reason for anything that is not a readable B·A adapter, :class:`MissingError` (66) if absent.
    ``sha256`` may be passed when the caller already hashed the file."""
    path = Path(path)
    if not path.exists():
        raise MissingError(f"{path}: " + ("a symlink whose target does not exist (or a symlink loop)"
                                          if path.is_symlink() else "no such file or folder"))
    config = None
    if path.is_dir():
        config, weights = _peft_folder(path)
        fmt = "peft"
        size = weights.stat().st_size + (path / "adapter_config.json").stat().st_size
    else:
        weights, fmt, size = path, None, path.stat().st_size
        _refuse_by_name(path)
        if path.name == "adapter_model.safetensors" and (path.parent / "adapter_config.json").is_file():
            config, _ = _peft_folder(path.parent)      # the weights file of a PEFT folder: its config holds alpha
            fmt = "peft"
    with open_safetensors(weights) as st:
        digest: dict[str, str] = {}
        worker = None
        if sha256 is None:
            # hash the mapped bytes on a second thread while the tensors are converted: hashlib and
            # numpy both release the GIL, so reading costs about max(hash, convert), not the sum
            job = (lambda: hashlib.sha256(st.buffer()).hexdigest()) if config is None and path == weights \
                else (lambda: adapter_sha256(path))
            worker = threading.Thread(target=lambda: digest.setdefault("sha", job()), daemon=True)
            worker.start()
        try:
            adapter = _parse(path, st, fmt, config, sha256 or "", size, check_finite)
        finally:
            if worker is not None:
                worker.join()
        if sha256 is None:
            adapter.sha256 = digest["sha"]
        return adapter


def _refuse_by_name(path: Path) -> None:
    head = read_head(path)     # refuses a FIFO/socket/device without opening it
    kind = sniff(head)
    if kind:
        raise refuse_sniffed(path, kind)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BadAdapterError(path, f"{path.suffix} file that is not a pickle lorasearch recognises; "
                                    "only .safetensors adapters are read")
    if path.suffix.lower() == ".gguf":
        raise refuse_sniffed(path, "gguf")


def _peft_folder(path: Path) -> tuple[dict, Path]:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise BadAdapterError(path, "folder has no adapter_config.json (not a PEFT adapter folder)")
    with os.fdopen(open_regular(cfg_path), "rb") as f:
        raw = f.read(HEADER_CAP + 1)
    if len(raw) > HEADER_CAP:
        raise BadAdapterError(path, f"adapter_config.json is over {HEADER_CAP} bytes: not a PEFT config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadAdapterError(path, f"adapter_config.json is not valid JSON (not UTF-8 at byte {e.start})") from None
    config = loads_limited(path, text, "adapter_config.json")
    if not isinstance(config, dict) or "peft_type" not in config:
        raise BadAdapterError(path, "adapter_config.json has no peft_type")
    peft_type = config["peft_type"]
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise BadAdapterError(path, f"unsupported PEFT method peft_type={short(peft_type)}; "
                                    "only LORA (ΔW = B·A) is supported")
    AlphaConfig(path, config, "adapter_config.json")      # validate lora_alpha / patterns before any tensor
    weights = path / "adapter_model.safetensors"
    if weights.exists() and not weights.is_file():
        os.close(open_regular(weights))       # raises: a FIFO/device/folder named adapter_model.safetensors
    if not weights.is_file():
        for name in ("adapter_model.bin", "adapter_model.pt"):
            if (path / name).is_file():
                raise BadAdapterError(path, f"{name} is a pickle, refused: unpickling can run code; convert it with "
                                            "peft (safe_serialization=True) or safetensors.torch.save_file")
        raise BadAdapterError(path, "PEFT folder has no adapter_model.safetensors")
    return config, weights


def _diffusers_meta(path, meta: dict[str, str], warnings: list[str]) -> dict | None:
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        d = loads_limited(path, raw, "lora_adapter_metadata")
    except BadAdapterError as e:
        warnings.append(f"{e.reason}; ignored (alpha = rank assumed where no .alpha tensor says otherwise)")
        return None
    return d if isinstance(d, dict) else None


def _parse(path: Path, st: SafetensorsFile, fmt: str | None, config: dict | None, sha256: str,
           size: int, check_finite: bool) -> LoraAdapter:
    keys = list(st.tensors)
    if not keys:
        raise BadAdapterError(path, "no tensors in the file")
    foreign = defaultdict(set)
    for k in keys:
        algo = foreign_algorithm(k)
        if algo:
            foreign[algo].add(foreign_stem(k))
    if foreign:
        algos = ", ".join(f"{a} x{len(s)} modules" for a, s in sorted(foreign.items(), key=lambda x: -len(x[1])))
        hint = ""
        args = st.metadata.get("ss_network_args")
        if args and "algo" in args:
            hint = f" [ss_network_args={args}]"
        raise BadAdapterError(path, f"unsupported adapter type: {algos}; only LoRA/LoCon (ΔW = B·A) is supported{hint}")

    groups: dict[str, dict] = defaultdict(dict)        # normalized name -> role -> key
    raw_path: dict[str, str] = {}                       # normalized name -> path as keyed (PEFT patterns)
    layouts, schemes, hints, unknown, guessed = Counter(), Counter(), set(), [], set()
    for k in keys:
        part = classify(k)
        if part is None:
            unknown.append(k)
            continue
        name, scheme = normalize_stem(part.stem, part.layout)
        if part.stem.startswith(("lora_te1_", "lora_te2_")):
            hints.add("kohya-te1")
        if part.role in groups[name]:
            raise BadAdapterError(path, f"module {short(name)} has two {part.role} tensors "
                                        f"({short(groups[name][part.role])} and {short(k)})")
        groups[name][part.role] = k
        stem = part.stem[len("base_model.model."):] if part.stem.startswith("base_model.model.") else part.stem
        raw_path.setdefault(name, stem)
        if scheme == "kohya-heuristic":
            guessed.add(name)
        if part.role != "alpha":
            layouts[part.layout] += 1
            schemes[scheme.replace("-heuristic", "")] += 1

    warnings: list[str] = []
    # non-B·A parts that we report rather than fold in
    for name, roles in groups.items():
        for role in ("dora", "bias"):
            if role in roles:
                unknown.append(roles.pop(role))
    n_dora = sum(1 for k in unknown if k.endswith(_DORA_KEYS))
    if n_dora:     # decision: accept, search on the B·A direction, say so (info shows warnings)
        warnings.append(f"DoRA adapter: magnitude vectors on {n_dora} modules ignored; ΔW is taken as the "
                        "B·A part only (DoRA's real update also rescales the base weight's columns)")
    groups = {n: r for n, r in groups.items() if r}
    real = {n: r for n, r in groups.items() if set(r) - {"alpha"}}
    if not real:
        if unknown:
            raise BadAdapterError(path, f"no LoRA tensors: {len(unknown)} tensors, none named like a LoRA "
                                        f"factor (e.g. {short(unknown[0])})")
        raise BadAdapterError(path, "no LoRA tensors (only alpha scalars)")
    orphans = [(n, r) for n, r in real.items()
               if not ({"A", "B"} <= set(r) or {"embA", "embB"} <= set(r))]
    if orphans:
        n, r = orphans[0]
        have = sorted(set(r) - {"alpha"})
        raise BadAdapterError(path, f"{len(orphans)} modules miss a LoRA half, e.g. {short(n)} has only "
                                    f"{', '.join(have)} ({short(r[have[0]])})")
    stray_alpha = [r["alpha"] for n, r in groups.items() if n not in real]
    unknown.extend(stray_alpha)

    if fmt is None:
        fmt = _format_name(layouts, schemes)
    meta_cfg = _diffusers_meta(path, st.metadata, warnings)
    alpha_src = _AlphaSources(path, config, meta_cfg)
    modules = []
    for name in sorted(real):
        modules.append(_module(path, st, name, real[name], raw_path[name], alpha_src, check_finite))
    other = [k for k in unknown if not k.endswith(_DORA_KEYS)]     # DoRA has its own warning above
    if other:
        shown = ", ".join(short(k) for k in other[:3])
        warnings.append(f"{len(other)} keys are not LoRA factors and were not used: {shown}"
                        + (" …" if len(other) > 3 else ""))
    if config:
        mts = config.get("modules_to_save")
        if mts and unknown:
            warnings.append(f"modules_to_save {mts} are full weights, not part of ΔW = B·A")
        if _truthy(config.get("use_dora")) and not n_dora:
            warnings.append("use_dora: true — the DoRA magnitude is not part of ΔW = B·A")
    guessed &= set(real)
    if guessed:
        warnings.append(f"{len(guessed)} kohya module names are in no architecture table; their dots were "
                        f"restored by heuristic (e.g. {short(min(guessed))})")
    scale_known = not (config is None and schemes.get("peft") and not any("alpha" in r for r in real.values())
                       and meta_cfg is None)
    if not scale_known:
        warnings.append("PEFT weights without adapter_config.json and without alpha: alpha = rank assumed "
                        "(scale 1.0); put adapter_config.json next to the file for the trained scale")
    trig = trigger_words(st.metadata)
    ambiguous: list[str] = []
    family = infer_family(modules, st.metadata, hints, ambiguous)
    if family in ("flux", "sd3", "sd3.5-large"):
        modules = split_fused(path, modules, warnings)
    for w in warnings:
        log.warning("%s: %s", path, w)
    return LoraAdapter(path=str(path), format=fmt, sha256=sha256, family=family, modules=modules, size=size,
                       metadata=dict(st.metadata), config=config, trigger_words=trig,
                       unknown_keys=sorted(unknown), warnings=warnings, scale_known=bool(scale_known),
                       family_note=ambiguous[0] if ambiguous else None)


def _format_name(layouts: Counter, schemes: Counter) -> str:
    layout = layouts.most_common(1)[0][0]
    scheme = schemes.most_common(1)[0][0]
    if layout == "kohya":
        return "kohya" if scheme == "kohya" else "diffusers-kohya"
    if layout in ("diffusers-mid", "diffusers-old", "xlabs"):
        return layout
    if scheme == "peft":
        return "peft-file"
    if scheme == "diffusers":
        return "diffusers"
    return "peft-file" if scheme == "plain" else "diffusers"


def _module(path, st: SafetensorsFile, name: str, roles: dict, raw: str, alpha_src: "_AlphaSources",
            check_finite: bool) -> LoraModule:
    emb = "embA" in roles
    A = st.array(roles["embA" if emb else "A"])
    B = st.array(roles["embB" if emb else "B"])
    dtype = st.tensors[roles["embA" if emb else "A"]].dtype
    if emb:   # ΔW[num_embeddings, dim] = (B @ A)ᵀ
        A, B = B.T.copy(), A.T.copy()
    if A.ndim not in (2, 4) or B.ndim not in (2, 4):
        raise BadAdapterError(path, f"module {short(name)}: factors must be 2-D or 4-D, got A {A.shape} and B {B.shape}")
    if "mid" in roles:   # LoCon Tucker: A'[a,i,h,w] = Σ_b mid[a,b,h,w]·down[b,i]
        mid = st.array(roles["mid"])
        if A.ndim != 4 or mid.ndim != 4 or mid.shape[1] != A.shape[0] or A.shape[2:] != (1, 1):
            raise BadAdapterError(path, f"module {short(name)}: lora_mid {mid.shape} does not fit lora_down {A.shape}")
        out_size = mid.shape[0] * A.shape[1] * mid.shape[2] * mid.shape[3]
        if max(mid.shape[2:]) > 16 or out_size > MAX_FACTOR:    # the product of two small tensors can be huge
            raise BadAdapterError(path, f"module {short(name)}: lora_mid {mid.shape} with lora_down {A.shape} "
                                        f"gives a {out_size}-value factor (kernel ≤ 16, ≤ {MAX_FACTOR} values)")
        A = np.einsum("abhw,bi->aihw", mid, A[:, :, 0, 0], optimize=True).astype(np.float32)
    r = A.shape[0]
    rb = B.shape[1]
    if r != rb:
        raise BadAdapterError(path, f"rank mismatch in module {short(name)}: A has r={r} (shape {tuple(A.shape)}) "
                                    f"but B has {rb} (shape {tuple(B.shape)})")
    if r == 0:
        raise BadAdapterError(path, f"module {short(name)} has rank 0")
    if B.ndim == 4 and B.shape[2:] != (1, 1):
        raise BadAdapterError(path, f"module {short(name)}: conv lora_up must be 1x1, got {tuple(B.shape)}")
    shape = (B.shape[0],) + tuple(A.shape[1:]) if A.ndim == 4 else (B.shape[0], A.shape[1])
    if 0 in shape:
        raise BadAdapterError(path, f"module {short(name)} adapts an empty weight (shape {shape})")
    A2 = A.reshape(r, -1)
    B2 = B.reshape(B.shape[0], r)
    if check_finite:
        for part, x in (("A", A2), ("B", B2)):
            flat = x.reshape(-1)
            with np.errstate(over="ignore", invalid="ignore"):
                ok = math.isfinite(float(np.dot(flat, flat)))    # one BLAS pass; exact count only on failure
            if not ok:
                bad = int(x.size - np.isfinite(x).sum())
                if bad:
                    raise BadAdapterError(path, f"module {short(name)}: {part} has {bad} NaN/Inf values of {x.size}")
                # finite, but squares overflow float32: ΔW and every similarity would be Inf/NaN
                raise BadAdapterError(path, f"module {short(name)}: {part} values are too large to compare "
                                            f"(max |x| = {float(np.abs(x).max()):.3g})")
    alpha, scale = _alpha(path, st, name, roles, raw, r, alpha_src)
    return LoraModule(name=name, A=np.ascontiguousarray(A2), B=np.ascontiguousarray(B2), scale=scale,
                      dtype=dtype, shape=tuple(int(s) for s in shape), alpha=alpha)


class _AlphaSources:
    """The PEFT config and the per-component configs of diffusers' ``lora_adapter_metadata``, validated
    once (a bad value refuses the file whichever modules it has)."""

    def __init__(self, path, config: dict | None, meta_cfg: dict | None):
        self.path, self.meta = path, meta_cfg
        self.config = AlphaConfig(path, config, "adapter_config.json") if config is not None else None
        self._by_comp: dict[str, tuple[AlphaConfig | None, bool]] = {}
        if meta_cfg is not None:
            self.flat = not any(k.split(".")[0] in ("unet", "text_encoder", "text_encoder_2", "transformer")
                                for k in meta_cfg)
            for comp in ("", "unet", "text_encoder", "text_encoder_2", "transformer", "text_encoder_3", "prior"):
                self._component(comp)

    def _component(self, comp: str) -> tuple[AlphaConfig | None, bool]:
        """(config for ``comp``, whether module paths are matched without the component prefix)."""
        if comp not in self._by_comp:
            pre = f"{comp}." if comp else ""
            cfg = {k[len(pre):]: v for k, v in self.meta.items() if k.startswith(pre)} if pre else {}
            stripped = True
            if not cfg and self.flat:
                cfg, stripped = self.meta, False
            use = "lora_alpha" in cfg or "alpha_pattern" in cfg
            self._by_comp[comp] = (AlphaConfig(self.path, cfg, "lora_adapter_metadata") if use else None, stripped)
        return self._by_comp[comp]

    def lookup(self, name: str, raw: str, r: int) -> tuple[float, float] | None:
        if self.config is not None:
            return self.config.alpha_scale(raw, r)
        if self.meta is not None:
            comp, sub = split_component(name)
            cfg, stripped = self._component(comp)
            if cfg is not None:
                return cfg.alpha_scale(sub if stripped else raw, r)
        return None


def _alpha(path, st, name, roles, raw, r, alpha_src: _AlphaSources) -> tuple[float, float]:
    if "alpha" in roles:
        a = st.array(roles["alpha"])
        if a.size != 1:
            raise BadAdapterError(path, f"module {short(name)}: alpha must be a scalar, got shape {tuple(a.shape)}")
        alpha = float(a.reshape(()))
        if not math.isfinite(alpha):
            raise BadAdapterError(path, f"module {short(name)}: alpha is {alpha} (as float32)")
        if alpha == 0:      # kohya: alpha 0 / None means alpha = rank
            alpha = float(r)
        return alpha, alpha / r
    hit = alpha_src.lookup(name, raw, r)
    return hit if hit is not None else (float(r), 1.0)


# ---- metadata ----------------------------------------------------------------------------------
def trigger_words(meta: dict[str, str], top: int = 10) -> list[str]:
    """``modelspec.trigger_phrase`` first, then the most frequent tags of kohya's ``ss_tag_frequency``."""
    words: list[str] = []
    phrase = meta.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        words.extend(w.strip() for w in phrase.split(",") if w.strip())
    raw = meta.get("ss_tag_frequency")
    if raw:
        try:       # kohya metadata is informative: a broken value loses the trigger words, not the file
            freq = loads_limited("", raw, "ss_tag_frequency")
        except BadAdapterError:
            freq = None
        counts: Counter = Counter()
        if isinstance(freq, dict):
            for tags in freq.values():
                if isinstance(tags, dict):
                    for tag, n in tags.items():
                        # JSON 1e400 / Infinity parse as float inf, 1000…0 as an int too big for a float
                        if isinstance(n, (int, float)) and not isinstance(n, bool) and abs(n) < 10 ** 15:
                            counts[str(tag).strip()] += int(n)
                        elif isinstance(n, str) and n.strip().isascii() and n.strip().isdigit() and len(n) < 16:
                            counts[str(tag).strip()] += int(n)
        for tag, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0])):
            if tag and tag not in words and len(words) < top:
                words.append(tag)
    return words


def describe(adapter: LoraAdapter, modules: bool = True) -> dict:
    """JSON-serializable summary for ``lorasearch info``; ``modules=False`` leaves out the
    per-module table (the index's catalog rows keep only the summary)."""
    ranks = Counter(m.rank for m in adapter.modules)
    alphas = Counter(m.alpha for m in adapter.modules)
    meta = adapter.metadata or {}
    summary = {k: v for k, v in meta.items()
               if (k.startswith(("ss_", "modelspec.")) and k not in ("ss_tag_frequency", "modelspec.thumbnail",
                                                                      "ss_bucket_info", "ss_datasets")
                   and len(v) <= 500) or k == "format"}
    comps = Counter(split_component(m.name)[0] or m.name.split(".")[0] for m in adapter.modules)
    return {
        "path": adapter.path, "format": adapter.format, "family": adapter.family, "sha256": adapter.sha256,
        "size": adapter.size, "n_modules": len(adapter.modules),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {str(k): v for k, v in sorted(alphas.items(), key=lambda x: (x[0] is None, x[0] or 0))},
        "params": int(sum(m.A.size + m.B.size for m in adapter.modules)),
        "components": dict(comps),
        "dtypes": dict(Counter(m.dtype for m in adapter.modules)),
        "scale_known": adapter.scale_known,
        "family_note": adapter.family_note,
        "modules": None if not modules else [
            {"name": m.name, "shape": list(m.shape), "rank": m.rank, "alpha": m.alpha, "scale": m.scale,
             "dtype": m.dtype} for m in adapter.modules],
        "metadata": summary,
        "peft_config": adapter.config,
        "trigger_words": list(adapter.trigger_words),
        "unknown_keys": list(adapter.unknown_keys),
        "warnings": list(adapter.warnings),
    }
