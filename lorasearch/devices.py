"""One meaning of ``--device`` for the whole project: ``auto | cpu | cuda | cuda:N``.

``resolve_device`` answers with a plain string (``"cpu"``, ``"cuda:0"`` …) so callers that never
touch torch (the default sketch encoder, the FAISS layer) can use it too. torch is imported only
when the answer depends on it: ``cpu`` never imports it, ``auto`` does only if torch is already
loaded or ``torch_ok`` says the caller is about to use torch anyway (a numpy-only caller asking
``auto`` gets ``cpu``, since its work would not run on a GPU). An explicit ``cuda`` with no CUDA
device is an ``UnavailableError`` (exit 69), a malformed device a ``UsageError`` (exit 2).
"""
from __future__ import annotations

import sys

from lorasearch.errors import UnavailableError, UsageError

DEVICES_HELP = "auto, cpu, cuda or cuda:N"


def parse_device(device) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ``"cpu"`` -> ``("cpu", None)``; ``auto``/None -> ``("auto", None)``.
    Accepts a ``torch.device`` too. Only the syntax is checked here."""
    if device is None:
        return "auto", None
    if not isinstance(device, str):          # torch.device or similar
        kind, index = getattr(device, "type", None), getattr(device, "index", None)
        if kind is None:
            raise UsageError(f"device {device!r}: expected {DEVICES_HELP}")
        return str(kind), index
    text = device.strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text, None
    if text.startswith("cuda:"):
        try:
            n = int(text[5:])
        except ValueError:
            n = -1
        if n >= 0:
            return "cuda", n
    raise UsageError(f"device {device!r}: expected {DEVICES_HELP}")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device="auto", torch_ok: bool = True) -> str:
    """The device work will run on: ``"cpu"`` or ``"cuda:N"``.

    ``torch_ok=False``: the caller runs numpy code unless a GPU is asked for explicitly, so
    ``auto`` means cpu without importing torch (unless torch is already imported)."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return "cpu"
    if kind == "auto":
        if not torch_ok and "torch" not in sys.modules:
            return "cpu"
        try:
            return "cuda:0" if _cuda_count() > 0 else "cpu"
        except ImportError:
            return "cpu"
    try:
        n = _cuda_count()
    except ImportError:
        raise UnavailableError(f"device {device!r} unavailable: torch is not installed") from None
    if n == 0:
        raise UnavailableError(f"device {device!r} unavailable: torch reports no CUDA device "
                               f"(use --device cpu or auto)")
    index = 0 if index is None else index
    if index >= n:
        raise UnavailableError(f"device {device!r} unavailable: torch sees {n} CUDA device(s)")
    return f"cuda:{index}"


def torch_device(device="auto"):
    """``resolve_device`` as a ``torch.device`` (imports torch)."""
    import torch

    return torch.device(resolve_device(device))


def is_cuda(device: str) -> bool:
    return parse_device(device)[0] == "cuda"
