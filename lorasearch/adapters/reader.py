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
import json
import logging
import math
import re
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
from .safetensors_strict import SafetensorsFile, open_safetensors, refuse_sniffed, sniff

log = logging.getLogger("lorasearch.adapters")
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
CHUNK = 1 << 20
_DORA_KEYS = (".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".dora_scale")


# ---- hashing ---------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
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
    if root.is_file():
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
                elif e.is_file() and e.suffix.lower() in ADAPTER_SUFFIXES:
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
        raise MissingError(f"{path}: no such file or folder")
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
    with open(path, "rb") as f:
        head = f.read(64)
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
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadAdapterError(path, f"adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise BadAdapterError(path, "adapter_config.json has no peft_type")
    if str(config["peft_type"]).upper() != "LORA":
        raise BadAdapterError(path, f"unsupported PEFT method peft_type={config['peft_type']!r}; "
                                    "only LORA (ΔW = B·A) is supported")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        for name in ("adapter_model.bin", "adapter_model.pt"):
            if (path / name).is_file():
                raise BadAdapterError(path, f"{name} is a pickle, refused: unpickling can run code; convert it with "
                                            "peft (safe_serialization=True) or safetensors.torch.save_file")
        raise BadAdapterError(path, "PEFT folder has no adapter_model.safetensors")
    return config, weights


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rule: the first pattern (dict order) with ``re.match(rf"(.*\\.)?({p})$", key)`` wins."""
    for p, v in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({p})$", key):
                return v
        except re.error:
            if key == p or key.endswith("." + p):
                return v
    return default


def _diffusers_meta(meta: dict[str, str]) -> dict | None:
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        d = json.loads(raw)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def _truthy(v) -> bool:
    """JSON booleans, or the strings some tools write ("true", "False", "1")."""
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v)


def _config_alpha(cfg: dict, key: str, r: int) -> tuple[float, float]:
    """(alpha, scale) from a PEFT-style config for module ``key`` of rank ``r``."""
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, key, cfg.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(r) if _truthy(cfg.get("use_rslora")) else alpha / r
    return alpha, scale


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
            raise BadAdapterError(path, f"module {name!r} has two {part.role} tensors "
                                        f"({groups[name][part.role]!r} and {k!r})")
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
                                        f"factor (e.g. {unknown[0]!r})")
        raise BadAdapterError(path, "no LoRA tensors (only alpha scalars)")
    orphans = [(n, r) for n, r in real.items()
               if not ({"A", "B"} <= set(r) or {"embA", "embB"} <= set(r))]
    if orphans:
        n, r = orphans[0]
        have = sorted(set(r) - {"alpha"})
        raise BadAdapterError(path, f"{len(orphans)} modules miss a LoRA half, e.g. {n!r} has only "
                                    f"{', '.join(have)} ({r[have[0]]!r})")
    stray_alpha = [r["alpha"] for n, r in groups.items() if n not in real]
    unknown.extend(stray_alpha)

    if fmt is None:
        fmt = _format_name(layouts, schemes)
    meta_cfg = _diffusers_meta(st.metadata)
    modules = []
    for name in sorted(real):
        modules.append(_module(path, st, name, real[name], raw_path[name], config, meta_cfg, check_finite))
    other = [k for k in unknown if not k.endswith(_DORA_KEYS)]     # DoRA has its own warning above
    if other:
        shown = ", ".join(repr(k) for k in other[:3])
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
                        f"restored by heuristic (e.g. {min(guessed)!r})")
    if config is None and schemes.get("peft") and not any("alpha" in r for r in real.values()) \
            and meta_cfg is None:
        warnings.append("PEFT weights without adapter_config.json and without alpha: alpha = rank assumed "
                        "(scale 1.0); put adapter_config.json next to the file for the trained scale")
    trig = trigger_words(st.metadata)
    family = infer_family(modules, st.metadata, hints)
    if family in ("flux", "sd3", "sd3.5-large"):
        modules = split_fused(path, modules, warnings)
    for w in warnings:
        log.warning("%s: %s", path, w)
    return LoraAdapter(path=str(path), format=fmt, sha256=sha256, family=family, modules=modules, size=size,
                       metadata=dict(st.metadata), config=config, trigger_words=trig,
                       unknown_keys=sorted(unknown), warnings=warnings)


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


def _module(path, st: SafetensorsFile, name: str, roles: dict, raw: str, config, meta_cfg,
            check_finite: bool) -> LoraModule:
    emb = "embA" in roles
    A = st.array(roles["embA" if emb else "A"])
    B = st.array(roles["embB" if emb else "B"])
    dtype = st.tensors[roles["embA" if emb else "A"]].dtype
    if emb:   # ΔW[num_embeddings, dim] = (B @ A)ᵀ
        A, B = B.T.copy(), A.T.copy()
    if A.ndim not in (2, 4) or B.ndim not in (2, 4):
        raise BadAdapterError(path, f"module {name!r}: factors must be 2-D or 4-D, got A {A.shape} and B {B.shape}")
    if "mid" in roles:   # LoCon Tucker: A'[a,i,h,w] = Σ_b mid[a,b,h,w]·down[b,i]
        mid = st.array(roles["mid"])
        if A.ndim != 4 or mid.ndim != 4 or mid.shape[1] != A.shape[0] or A.shape[2:] != (1, 1):
            raise BadAdapterError(path, f"module {name!r}: lora_mid {mid.shape} does not fit lora_down {A.shape}")
        A = np.einsum("abhw,bi->aihw", mid, A[:, :, 0, 0], optimize=True).astype(np.float32)
    r = A.shape[0]
    rb = B.shape[1]
    if r != rb:
        raise BadAdapterError(path, f"rank mismatch in module {name!r}: A has r={r} (shape {tuple(A.shape)}) "
                                    f"but B has {rb} (shape {tuple(B.shape)})")
    if r == 0:
        raise BadAdapterError(path, f"module {name!r} has rank 0")
    if B.ndim == 4 and B.shape[2:] != (1, 1):
        raise BadAdapterError(path, f"module {name!r}: conv lora_up must be 1x1, got {tuple(B.shape)}")
    shape = (B.shape[0],) + tuple(A.shape[1:]) if A.ndim == 4 else (B.shape[0], A.shape[1])
    if 0 in shape:
        raise BadAdapterError(path, f"module {name!r} adapts an empty weight (shape {shape})")
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
                    raise BadAdapterError(path, f"module {name!r}: {part} has {bad} NaN/Inf values of {x.size}")
                # finite, but squares overflow float32: ΔW and every similarity would be Inf/NaN
                raise BadAdapterError(path, f"module {name!r}: {part} values are too large to compare "
                                            f"(max |x| = {float(np.abs(x).max()):.3g})")
    alpha, scale = _alpha(path, st, name, roles, raw, r, config, meta_cfg)
    return LoraModule(name=name, A=np.ascontiguousarray(A2), B=np.ascontiguousarray(B2), scale=scale,
                      dtype=dtype, shape=tuple(int(s) for s in shape), alpha=alpha)


def _alpha(path, st, name, roles, raw, r, config, meta_cfg) -> tuple[float, float]:
    if "alpha" in roles:
        a = st.array(roles["alpha"])
        if a.size != 1:
            raise BadAdapterError(path, f"module {name!r}: alpha must be a scalar, got shape {tuple(a.shape)}")
        alpha = float(a.reshape(()))
        if not math.isfinite(alpha):
            raise BadAdapterError(path, f"module {name!r}: alpha is {alpha}")
        if alpha == 0:      # kohya: alpha 0 / None means alpha = rank
            alpha = float(r)
        return alpha, alpha / r
    if config is not None:
        return _config_alpha(config, raw, r)
    if meta_cfg is not None:
        comp, sub = split_component(name)
        pre = f"{comp}." if comp else ""
        cfg = {k[len(pre):]: v for k, v in meta_cfg.items() if k.startswith(pre)} if pre else {}
        if not cfg and not any(k.split(".")[0] in ("unet", "text_encoder", "text_encoder_2", "transformer")
                               for k in meta_cfg):
            cfg, sub = meta_cfg, raw
        if "lora_alpha" in cfg or "alpha_pattern" in cfg:
            return _config_alpha(cfg, sub, r)
    return float(r), 1.0


# ---- metadata ----------------------------------------------------------------------------------
def trigger_words(meta: dict[str, str], top: int = 10) -> list[str]:
    """``modelspec.trigger_phrase`` first, then the most frequent tags of kohya's ``ss_tag_frequency``."""
    words: list[str] = []
    phrase = meta.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        words.extend(w.strip() for w in phrase.split(",") if w.strip())
    raw = meta.get("ss_tag_frequency")
    if raw:
        try:
            freq = json.loads(raw)
        except ValueError:
            freq = None
        counts: Counter = Counter()
        if isinstance(freq, dict):
            for tags in freq.values():
                if isinstance(tags, dict):
                    for tag, n in tags.items():
                        try:
                            counts[str(tag).strip()] += int(n)
                        except (TypeError, ValueError):
                            pass
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
        "modules": None if not modules else [
            {"name": m.name, "shape": list(m.shape), "rank": m.rank, "alpha": m.alpha, "scale": m.scale,
             "dtype": m.dtype} for m in adapter.modules],
        "metadata": summary,
        "peft_config": adapter.config,
        "trigger_words": list(adapter.trigger_words),
        "unknown_keys": list(adapter.unknown_keys),
        "warnings": list(adapter.warnings),
    }
