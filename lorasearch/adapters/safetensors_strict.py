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
import os
import reprlib
import stat
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
MAX_DIM = 1 << 40           # no real tensor has a dimension near this; bigger ones overflow numpy's int64 maths
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


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 200, 60, 6, 4, 3


def short(x) -> str:
    """A bounded repr for values taken from a file (never megabytes, never deep recursion)."""
    return _SHORT.repr(x)


_MAGIC = ((b"\x7fELF", "an ELF executable"), (b"\x1f\x8b", "a gzip archive"), (b"BZh", "a bzip2 archive"),
          (b"\xfd7zXZ", "an xz archive"), (b"7z\xbc\xaf", "a 7z archive"), (b"\x28\xb5\x2f\xfd", "a zstd archive"),
          (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"RIFF", "a RIFF (WebP/WAV) file"), (b"%PDF", "a PDF document"), (b"\x89HDF", "an HDF5 file"),
          (b"\x93NUMPY", "a numpy .npy file"), (b"SQLite format 3", "an SQLite database"),
          (b"PAR1", "a Parquet file"), (b"ARROW1", "an Arrow file"))


def content_kind(head: bytes) -> str:
    """What a file that is not safetensors looks like, in words, for error messages: the file's own
    bytes are never echoed (a symlink to /etc/passwd must not print its first line)."""
    if not head:
        return "an empty file"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    sniffed = sniff(head)
    if sniffed:
        return {"pickle-zip": "a zip archive (PyTorch pickle?)", "pickle": "a Python pickle", "gguf": "a GGUF file",
                "html": "an HTML page", "json": "a JSON text"}[sniffed]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:      # a multi-byte character cut at the end of the sample is still text
        text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 else None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "a text file"
    return "binary data of an unknown kind"


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
    count: int = 0  # number of elements


@dataclass
class SafetensorsFile:
    """A validated safetensors file: its tensor directory, its ``__metadata__`` and an open mmap."""

    path: Path
    size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    _mm: mmap.mmap | None = None

    def array(self, name: str) -> np.ndarray:
        """The tensor as a float32 numpy array: one new array, read straight from the mmap (zero-copy
        view + one conversion). bf16 is the top half of a float32 and fp8 has 256 values, so both are
        decoded in numpy (no torch on the read path). Values beyond float32 become ±inf silently (the
        reader's finiteness check then refuses them with a reason; numpy's warnings are not ours to print)."""
        t = self.tensors[name]
        n = t.count
        buf = self._mm if self._mm is not None else b""
        if n == 0:
            return np.zeros(t.shape, np.float32)
        with np.errstate(all="ignore"):
            if t.dtype == "BF16":
                out = np.empty(n, np.uint32)
                np.copyto(out, np.frombuffer(buf, np.uint16, n, t.start))     # widen into the result, no temp
                out <<= 16
                out = out.view(np.float32)
            elif t.dtype in _FP8:
                out = fp8_table(t.dtype)[np.frombuffer(buf, np.uint8, n, t.start)]
            elif t.dtype in _NUMPY:
                out = np.frombuffer(buf, _NUMPY[t.dtype], n, t.start).astype(np.float32)
            else:
                raise BadAdapterError(self.path, f"tensor {short(name)} has dtype {t.dtype}, which lorasearch "
                                                 "cannot read")
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


# fp8 formats: (exponent bits, mantissa bits, bias, kind); "fn" = no infinities, NaN at S.1111.111 (OCP
# E4M3FN); "ieee" = inf/NaN at the all-ones exponent (E5M2); "fnuz" = no inf, no -0, 0x80 is the one NaN.
_FP8 = {"F8_E4M3": (4, 3, 7, "fn"), "F8_E5M2": (5, 2, 15, "ieee"),
        "F8_E4M3FNUZ": (4, 3, 8, "fnuz"), "F8_E5M2FNUZ": (5, 2, 16, "fnuz")}
_FP8_TABLES: dict[str, np.ndarray] = {}


def fp8_table(dtype: str) -> np.ndarray:
    """float32 value of each of the 256 bit patterns of an fp8 dtype (numpy has no fp8 type)."""
    if dtype not in _FP8_TABLES:
        e_bits, m_bits, bias, kind = _FP8[dtype]
        b = np.arange(256)
        sign = np.where(b >> 7, -1.0, 1.0)
        e = (b >> m_bits) & ((1 << e_bits) - 1)
        f = (b & ((1 << m_bits) - 1)) / float(1 << m_bits)
        val = sign * np.where(e == 0, f * 2.0 ** (1 - bias), (1 + f) * 2.0 ** (e - bias))
        top = (1 << e_bits) - 1
        if kind == "fn":
            val[(e == top) & (f == 1 - 1 / (1 << m_bits))] = np.nan
        elif kind == "ieee":
            val[(e == top) & (f == 0)] = sign[(e == top) & (f == 0)] * np.inf
            val[(e == top) & (f != 0)] = np.nan
        else:
            val[0x80] = np.nan
        _FP8_TABLES[dtype] = val.astype(np.float32)
    return _FP8_TABLES[dtype]


def _no_dupes(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key in header: {k!r}")
        out[k] = v
    return out


_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def special_kind(mode: int) -> str | None:
    """``"a FIFO (named pipe)"`` … for anything that is not a regular file (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _SPECIAL if test(mode)), "not a regular file")


def open_regular(path, refuse=True) -> int:
    """An fd for reading ``path``, which must be a regular file (after symlinks). A FIFO, socket or device
    is never opened for reading: opening a FIFO blocks until a writer comes, reading a device can be endless.
    The check is made before opening (stat) and again on the fd (fstat), so swapping the file in between
    gains nothing; O_NONBLOCK keeps even that open from waiting."""
    st = os.stat(path)
    kind = special_kind(st.st_mode)
    if kind is None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(fd)
        kind = special_kind(st.st_mode)
        if kind is None:
            return fd
        os.close(fd)
    raise BadAdapterError(path, f"{kind}, not a regular file: refused (never opened)")


def read_head(path, n: int = 64) -> bytes:
    fd = open_regular(path)
    try:
        return os.read(fd, n)
    finally:
        os.close(fd)


def open_safetensors(path) -> SafetensorsFile:
    """Open and strictly validate ``path``; raises :class:`BadAdapterError` with a one-line reason."""
    path = Path(path)
    fd = open_regular(path)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head, raw, n = _read_header(path, f, size)
        header = _parse_header(path, raw, n)
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
                raise BadAdapterError(path, f"tensor {short(t.name)} starts at data byte {rel} but the previous "
                                            f"tensor ends at {pos}: it {what}")
            pos = t.end - data_start
        if pos > data_size:
            raise BadAdapterError(path, f"data section should be {pos} bytes but the file has {data_size}: "
                                        f"truncated ({pos - data_size} bytes missing; re-download)")
        if pos < data_size:
            raise BadAdapterError(path, f"{data_size - pos} bytes after the last tensor (data section should be "
                                        f"{pos} bytes): not a clean safetensors file")
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size > 0 else None
    finally:
        os.close(fd)
    return SafetensorsFile(path, size, {t.name: t for t in infos}, dict(meta), mm)


def _read_header(path, f, size: int) -> tuple[bytes, bytes, int]:
    head = f.read(64)
    kind = sniff(head)
    if kind:
        raise refuse_sniffed(path, kind)
    if size < 8:
        raise BadAdapterError(path, f"file is {size} bytes, too small for a safetensors header (8 bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > HEADER_CAP:
        # the value itself is not printed: it is the file's first 8 bytes, i.e. its contents
        raise BadAdapterError(path, f"not a safetensors file: its first 8 bytes are no header length (over the "
                                    f"{HEADER_CAP}-byte cap); the file looks like {content_kind(head)}")
    if 8 + n > size:
        raise BadAdapterError(path, f"header length field says {n} bytes but only {size - 8} bytes follow it: "
                                    f"truncated or not safetensors (the file looks like {content_kind(head)})")
    if n < 2:
        raise BadAdapterError(path, f"safetensors header is {n} bytes, too short for a JSON object")
    f.seek(8)
    raw = f.read(n)
    if len(raw) != n:
        raise BadAdapterError(path, f"file shrank while being read (header of {n} bytes, got {len(raw)})")
    return head, raw, n


def _parse_header(path, raw: bytes, n: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadAdapterError(path, f"safetensors header is not valid UTF-8 (byte {e.start} of {n})") from None
    if not text.startswith("{"):
        raise BadAdapterError(path, "safetensors header must start with '{' (a JSON object)")
    header = loads_limited(path, text, "safetensors header", pairs_hook=_no_dupes)
    if not isinstance(header, dict):
        raise BadAdapterError(path, "safetensors header is not a JSON object")
    return header


MAX_JSON_DEPTH = 64       # real headers and configs nest ≤ 4 levels; Python's json recurses per level


def json_depth(obj, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON value, walked without recursion; stops counting past ``limit``."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return deepest


def loads_limited(path, text: str, what: str, pairs_hook=None):
    """``json.loads`` (which recurses once per level) that refuses (BadAdapterError) deep nesting and invalid JSON alike, with a reason."""
    try:
        obj = json.loads(text, object_pairs_hook=pairs_hook)
    except RecursionError:
        raise BadAdapterError(path, f"{what} nests JSON too deeply: refused") from None
    except ValueError as e:
        msg = str(e) if str(e).startswith("duplicate key") else f"{what} is not valid JSON ({short(str(e))})"
        raise BadAdapterError(path, msg) from None
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise BadAdapterError(path, f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels: refused")
    return obj


def _entry(path, name: str, e, data_start: int) -> TensorInfo:
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        got = short(sorted(map(str, e))) if isinstance(e, dict) else type(e).__name__
        raise BadAdapterError(path, f"header entry {short(name)} must have exactly dtype, shape, data_offsets; "
                                    f"got {got}")
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise BadAdapterError(path, f"tensor {short(name)} has unknown dtype {short(dtype)}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM
                                              for s in shape):
        raise BadAdapterError(path, f"tensor {short(name)} has an invalid shape {short(shape)} (dimensions are "
                                    f"integers 0..2^40)")
    if len(shape) > 8:
        raise BadAdapterError(path, f"tensor {short(name)} has {len(shape)} dimensions (a LoRA factor has 2 or 4)")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs) or offs[1] < offs[0]):
        raise BadAdapterError(path, f"tensor {short(name)} has invalid data_offsets {short(offs)}")
    count = 1
    for s in shape:
        count *= s
    nbytes = (count * DTYPE_BITS[dtype] + 7) // 8
    if nbytes != offs[1] - offs[0]:
        raise BadAdapterError(path, f"tensor {short(name)} ({dtype}, shape {shape}) needs {nbytes} bytes but its "
                                    f"offsets span {offs[1] - offs[0]}")
    return TensorInfo(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1], count)
