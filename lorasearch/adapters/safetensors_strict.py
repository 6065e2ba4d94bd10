"""A strict safetensors reader: sniff non-safetensors inputs, validate the header, mmap the tensors.

Hand-written because the ``safetensors`` library accepts what a search index must not (measured with
safetensors 0.8.0, see research notes §6.2): duplicate header keys (last one silently wins), a header
not starting with ``{``, extra fields in an entry; and its errors ("invalid header length",
"incomplete metadata, file not fully covered") name no byte counts and say nothing useful for a
pickle, a GGUF file or a Civitai HTML error page saved as ``.safetensors``. Tensors are read
through one ``mmap`` (zero-copy ``numpy.frombuffer``, converted to float32), which is as fast as the
library's ``safe_open``.
"""
from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadAdapterError

HEADER_CAP = 100_000_000    # the library's own cap: LoRA headers are ~100 KB, but ss_tag_frequency and
                            # modelspec.thumbnail data URLs can make them several MB
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
              "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
              "I64": 64, "U64": 64}
_NUMPY = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
          "I16": np.int16, "U16": np.uint16, "I32": np.int32, "U32": np.uint32, "I64": np.int64,
          "U64": np.uint64, "BOOL": np.bool_}
_CONVERT = "convert it to .safetensors (e.g. torch.load(..., weights_only=True) then safetensors.torch.save_file)"


def sniff(head: bytes) -> str | None:
    """Name the kind of a file that is clearly not safetensors, from its first bytes (None = maybe it is).

    A safetensors file has its JSON header's ``{`` at byte 8; a length field can itself start with
    bytes that look like a magic number (a 640-byte header begins ``80 02``), so that wins first."""
    if len(head) > 8 and head[8:9] == b"{" and b"\0" in head[1:8]:
        return None
    if head.startswith(b"PK\x03\x04"):
        return "pickle-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"GGUF"):
        return "gguf"
    text = head.lstrip()[:15].lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "html"
    if text.startswith((b"{", b"[")):
        return "json"
    return None


def refuse_sniffed(path, kind: str) -> BadAdapterError:
    reason = {
        "pickle-zip": f"PyTorch pickle (zip container), refused: unpickling can run code; {_CONVERT}",
        "pickle": f"Python pickle, refused: unpickling can run code; {_CONVERT}",
        "gguf": "GGUF file (llama.cpp); GGUF LoRA adapters are not supported, use the safetensors original",
        "html": "an HTML page, not a safetensors file (a failed download? re-download it)",
        "json": "a JSON text file, not a safetensors file (pass the adapter folder or its .safetensors)",
    }[kind]
    return BadAdapterError(path, reason)


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple
    start: int      # absolute byte offsets in the file
    end: int


@dataclass
class SafetensorsFile:
    """A validated safetensors file: its tensor directory, its ``__metadata__`` and an open mmap."""

    path: Path
    size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    _mm: mmap.mmap | None = None

    def array(self, name: str) -> np.ndarray:
        """The tensor as a float32 numpy array (a copy; bf16 via a 16-bit shift, numpy has no bf16)."""
        t = self.tensors[name]
        n = int(np.prod(t.shape)) if t.shape else 1
        buf = self._mm if self._mm is not None else b""
        if t.dtype == "BF16":
            raw = np.frombuffer(buf, np.uint16, n, t.start)
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        elif t.dtype in ("F16", "F32", "F64"):
            out = np.frombuffer(buf, _NUMPY[t.dtype], n, t.start).astype(np.float32)
        elif t.dtype.startswith("F8_E4M3") or t.dtype.startswith("F8_E5M2"):
            out = _fp8(bytes(buf[t.start:t.end]), t.dtype, self.path, name)
        elif t.dtype in _NUMPY:
            out = np.frombuffer(buf, _NUMPY[t.dtype], n, t.start).astype(np.float32)
        else:
            raise BadAdapterError(self.path, f"tensor {name!r} has dtype {t.dtype}, which lorasearch cannot read")
        return out.reshape(t.shape)

    def buffer(self):
        return self._mm if self._mm is not None else b""

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fp8(raw: bytes, dtype: str, path=None, name: str = "") -> np.ndarray:
    try:     # numpy has no fp8; torch does (>= 2.1). Reading fp8 is the only thing that needs torch here.
        import torch
        torch.float8_e4m3fn
    except (ImportError, AttributeError):
        raise BadAdapterError(path, f"tensor {name!r} is {dtype} (fp8); reading fp8 needs torch >= 2.1, "
                                    "which is not installed") from None

    tdt = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz}[dtype]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(tdt).float().numpy()


def _no_dupes(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key in header: {k!r}")
        out[k] = v
    return out


def open_safetensors(path) -> SafetensorsFile:
    """Open and strictly validate ``path``; raises :class:`BadAdapterError` with a one-line reason."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        kind = sniff(head)
        if kind:
            raise refuse_sniffed(path, kind)
        if size < 8:
            raise BadAdapterError(path, f"file is {size} bytes, too small for a safetensors header (8 bytes)")
        (n,) = struct.unpack("<Q", head[:8])
        if n > HEADER_CAP:
            raise BadAdapterError(path, f"not a safetensors file: header length field says {n} bytes "
                                        f"(cap {HEADER_CAP}); first bytes {head[:8]!r}")
        if 8 + n > size:
            raise BadAdapterError(path, f"header length field says {n} bytes but only {size - 8} bytes follow it: "
                                        "truncated or not safetensors")
        if n < 2:
            raise BadAdapterError(path, f"safetensors header is {n} bytes, too short for a JSON object")
        f.seek(8)
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadAdapterError(path, f"safetensors header is not valid UTF-8 (byte {e.start} of {n})") from None
    if not text.startswith("{"):
        raise BadAdapterError(path, f"safetensors header must start with '{{', found {text[:1]!r}")
    try:
        header = json.loads(text, object_pairs_hook=_no_dupes)
    except ValueError as e:
        msg = str(e) if str(e).startswith("duplicate key") else f"safetensors header is not valid JSON ({e})"
        raise BadAdapterError(path, msg) from None
    if not isinstance(header, dict):
        raise BadAdapterError(path, "safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BadAdapterError(path, "__metadata__ must map strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    infos = [_entry(path, name, e, data_start) for name, e in header.items()]
    pos = 0
    for t in sorted(infos, key=lambda t: (t.start, t.end)):
        rel = t.start - data_start
        if rel != pos:
            what = "overlaps the previous tensor" if rel < pos else f"leaves a gap of {rel - pos} bytes"
            raise BadAdapterError(path, f"tensor {t.name!r} starts at data byte {rel} but the previous tensor "
                                        f"ends at {pos}: it {what}")
        pos = t.end - data_start
    if pos > data_size:
        raise BadAdapterError(path, f"data section should be {pos} bytes but the file has {data_size}: "
                                    f"truncated ({pos - data_size} bytes missing; re-download)")
    if pos < data_size:
        raise BadAdapterError(path, f"{data_size - pos} bytes after the last tensor (data section should be "
                                    f"{pos} bytes): not a clean safetensors file")
    mm = None
    if size > 0:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return SafetensorsFile(path, size, {t.name: t for t in infos}, dict(meta), mm)


def _entry(path, name: str, e, data_start: int) -> TensorInfo:
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        got = sorted(e) if isinstance(e, dict) else type(e).__name__
        raise BadAdapterError(path, f"header entry {name!r} must have exactly dtype, shape, data_offsets; got {got}")
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise BadAdapterError(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise BadAdapterError(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs) or offs[1] < offs[0]):
        raise BadAdapterError(path, f"tensor {name!r} has invalid data_offsets {offs!r}")
    count = 1
    for s in shape:
        count *= s
    nbytes = (count * DTYPE_BITS[dtype] + 7) // 8
    if nbytes != offs[1] - offs[0]:
        raise BadAdapterError(path, f"tensor {name!r} ({dtype}, shape {shape}) needs {nbytes} bytes but its "
                                    f"offsets span {offs[1] - offs[0]}")
    return TensorInfo(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])
