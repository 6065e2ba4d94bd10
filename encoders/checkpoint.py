"""Trained encoders as a folder: ``config.json`` + ``model.safetensors`` + ``CARD.md``.

    config.json        {"format": 1, "encoder": "w2t", "version": "1", "hyperparameters": {...},
                        "families": [...], "training": {...}, ...}
    model.safetensors  the weights (safetensors: no pickle, loads without running code)
    CARD.md            what it was trained on and how it scored, for people
    loss_curve.json    per-epoch losses and validation metrics (when trained here)

``--encoder w2t:PATH`` resolves through ``load_encoder``; ``w2t:minilm`` (a bare name that is
not a folder) means the checkpoint shipped in ``encoders/checkpoints/w2t-minilm``, so an index
built with it records a spec that does not depend on where the package is installed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from lorasearch.errors import BadAdapterError, MissingError, UsageError

FORMAT = 1
SHIPPED = Path(__file__).resolve().parent / "checkpoints"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "CARD.md"
CURVE = "loss_curve.json"

if TYPE_CHECKING:   # torch is imported where a torch model is made or read: the numpy-only
    import torch    # encoders (subspace) read their checkpoints without it


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is an error (exit 69).
    The project's one rule, ``lorasearch.devices.resolve_device``."""
    from lorasearch.devices import torch_device

    return torch_device(device)


def model_classes(name: str):
    """(torch model class, Encoder class) for a learned encoder name."""
    if name == "w2t":
        from lorasearch.encoders.w2t import W2T, W2TEncoder
        return W2T, W2TEncoder
    if name == "glnet":
        from lorasearch.encoders.glnet import GLNet, GLNetEncoder
        return GLNet, GLNetEncoder
    raise UsageError(f"{name!r} is not a learned encoder (w2t, glnet)")


def save_checkpoint(path, name: str, tensors: dict[str, torch.Tensor], hyperparameters: dict,
                    version: str = "1", extra: dict | None = None, card: str | None = None,
                    loss_curve: list | None = None) -> Path:
    """Write the folder (created if needed); tensors are saved contiguous, on CPU."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "encoder": name, "version": version, "hyperparameters": hyperparameters}
    config.update(extra or {})
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / WEIGHTS),
              metadata={"encoder": name, "version": version})
    (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if loss_curve is not None:
        (path / CURVE).write_text(json.dumps(loss_curve, indent=1) + "\n")
    (path / CARD).write_text(card or f"# {name} checkpoint\n\nNo training record.\n")
    return path


def read_checkpoint(path, expect: str | None = None, numpy: bool = False) -> tuple[dict, dict]:
    """(config, tensors) of a checkpoint folder, with one-line errors for what is wrong; tensors
    as torch tensors, or numpy arrays with ``numpy=True`` (torch is then never imported)."""
    if numpy:
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise MissingError(f"{path}: checkpoint folder does not exist")
    if not path.is_dir():
        raise BadAdapterError(path, "a checkpoint is a folder with config.json and model.safetensors")
    for f in (CONFIG, WEIGHTS):
        if not (path / f).is_file():
            raise MissingError(f"{path}: checkpoint has no {f}")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadAdapterError(path / CONFIG, f"not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(config, dict) or "encoder" not in config:
        raise BadAdapterError(path / CONFIG, "no 'encoder' field")
    if config.get("format", 0) > FORMAT:
        raise BadAdapterError(path / CONFIG, f"checkpoint format {config['format']} is newer than this lorasearch")
    if expect and config["encoder"] != expect:
        raise UsageError(f"{path}: checkpoint is for encoder {config['encoder']!r}, not {expect!r}")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise BadAdapterError(path / WEIGHTS, f"not a readable safetensors file ({type(e).__name__})") from None
    return config, tensors


def save_model(path, name: str, model: torch.nn.Module, **kw) -> Path:
    return save_checkpoint(path, name, dict(model.state_dict()), dict(model.config), **kw)


def shipped() -> list[str]:
    """Specs of the checkpoints that ship with lorasearch, e.g. ``["w2t:minilm"]``."""
    if not SHIPPED.is_dir():
        return []
    return sorted(p.name.replace("-", ":", 1) for p in SHIPPED.iterdir() if (p / CONFIG).is_file())


def resolve(name: str, arg: str) -> Path:
    """The folder ``arg`` names: a path, or a bare name of a shipped checkpoint (``minilm-x`` for
    ``SHIPPED/NAME-minilm-x``)."""
    path = Path(arg)
    if not path.exists() and "/" not in arg and (SHIPPED / f"{name}-{arg}").is_dir():
        path = SHIPPED / f"{name}-{arg}"
    return path


def identity(path: Path, arg: str) -> tuple[str, str]:
    """(what the index records as the checkpoint, the weights' digest). The recorded spec is a
    shipped name as given, any other folder as an absolute path, so an index built from one working
    directory is usable from another; the digest in the version makes an index notice a retrained
    checkpoint at the same path."""
    digest = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()[:12]
    shipped_name = path.parent == SHIPPED and "/" not in arg
    return (arg if shipped_name else str(path.resolve())), digest


def load_model(path, expect: str | None = None) -> tuple[torch.nn.Module, dict]:
    config, tensors = read_checkpoint(path, expect)
    model_cls, _ = model_classes(config["encoder"])
    model = model_cls(**config["hyperparameters"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "weights do not match the config"
        raise BadAdapterError(Path(path) / WEIGHTS, f"weights do not match config.json: {first}") from None
    return model.eval(), config


def load_encoder(name: str, arg: str | None, device: str = "auto"):
    """The registry factory body for ``w2t:PATH`` and ``glnet:PATH``."""
    if not arg:
        raise UsageError(f"encoder {name!r} needs a trained checkpoint: --encoder {name}:PATH "
                         f"(train one with `lorasearch train --encoder {name}`)")
    path = resolve(name, arg)
    if not path.exists():
        have = [s for s in shipped() if s.startswith(name + ":")]
        raise MissingError(f"{arg}: checkpoint folder does not exist"
                           + (f" (shipped: {', '.join(have)})" if have else ""))
    model, config = load_model(path, expect=name)
    _, enc_cls = model_classes(name)
    recorded, digest = identity(path, arg)
    enc = enc_cls(model, path=recorded, device=device, version=f"{config.get('version', '1')}-{digest}")
    enc.config = config
    return enc
