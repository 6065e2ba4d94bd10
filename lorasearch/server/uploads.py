"""Adapter uploads: a multipart body streamed to files on disk, the size limit enforced as bytes arrive.

Why not FastAPI's ``UploadFile``: Starlette spools the whole body (to a temporary file) before the
endpoint runs, so a 50 GB upload would be written out in full before anyone could refuse it. Here
python-multipart's push parser is fed chunk by chunk from ``request.stream()`` and the upload is
refused (413) the moment the file bytes pass the limit; only the counting and the file handling
are ours.

Accepted shapes (field name ``file``, any number of parts up to MAX_PARTS):
one adapter file (``.safetensors``; other suffixes reach the reader, which explains refusals), a PEFT
folder as one ``.zip``, or a PEFT folder as its two files ``adapter_config.json`` +
``adapter_model.safetensors``.
"""
from __future__ import annotations

import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from lorasearch.errors import BadAdapterError, LorasearchError, UsageError

MAX_PARTS = 4                  # a query or add needs at most two files
HEADER_SLACK = 64 * 1024       # multipart boundaries and part headers on top of the file bytes
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


class UploadTooLargeError(LorasearchError):
    """The upload passed ``--max-upload-mb`` (HTTP 413)."""

    exit_code = 65


@dataclass
class Part:
    filename: str      # the client's name, reduced to a safe base name
    path: Path         # where its bytes are on disk
    size: int = 0


def safe_name(filename: str | None, default: str = "upload.safetensors") -> str:
    """The client's file name without any folder part, control or odd characters, at most 120 chars."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._+-]", "_", base).lstrip(".")[:120]
    return base or default


async def receive(request, dest: Path, limit: int) -> list[Part]:
    """Stream the multipart body of ``request`` into files under ``dest``; raise on > ``limit`` file bytes."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UsageError("expected a multipart/form-data upload with the adapter in field `file`")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + HEADER_SLACK:
        raise UploadTooLargeError(f"upload of {int(declared)} bytes is over the limit of {limit} bytes")

    parts: list[Part] = []
    state = {"field": b"", "value": b"", "headers": {}, "out": None, "part": None, "total": 0}

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]
        if len(state["value"]) > 4096:
            raise UsageError("multipart part header is too long")

    def on_header_end():
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        _disp, opts = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["headers"] = {}
        if b"filename" not in opts:          # a plain form field: ignored, but its bytes still count
            state["out"], state["part"] = None, None
            return
        if len(parts) >= MAX_PARTS:
            raise UsageError(f"too many files in one upload (at most {MAX_PARTS})")
        name = safe_name(opts[b"filename"].decode("utf-8", "replace"))
        part = Part(name, dest / f"part{len(parts)}")
        parts.append(part)
        state["part"], state["out"] = part, open(part.path, "wb")

    def on_part_data(data, start, end):
        n = end - start
        state["total"] += n
        if state["total"] > limit:
            raise UploadTooLargeError(f"upload is over the limit of {limit} bytes (refused while receiving)")
        if state["out"] is not None:
            state["out"].write(data[start:end])
            state["part"].size += n

    def on_part_end():
        if state["out"] is not None:
            state["out"].close()
            state["out"] = None

    parser = MultipartParser(boundary, {
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + HEADER_SLACK:
                raise UploadTooLargeError(f"upload is over the limit of {limit} bytes (refused while receiving)")
            parser.write(chunk)
        parser.finalize()
    except LorasearchError:
        raise
    except Exception as e:  # python-multipart's own parse errors: a malformed body is a usage error
        raise UsageError(f"malformed multipart upload ({type(e).__name__}: {e})") from None
    finally:
        if state["out"] is not None:
            state["out"].close()
    if not parts:
        raise UsageError("no file in the upload; send the adapter as multipart field `file`")
    return parts


def assemble(parts: list[Part], dest: Path, limit: int) -> tuple[Path, str]:
    """Arrange uploaded parts as something ``load_adapter`` reads: ``(path, display name)``."""
    names = sorted(p.filename for p in parts)
    if len(parts) == 1 and parts[0].filename.lower().endswith(".zip"):
        return _unzip(parts[0], dest, limit)
    if len(parts) == 1:
        target = dest / parts[0].filename
        parts[0].path.replace(target)
        return target, parts[0].filename
    if names == sorted(PEFT_FILES):
        folder = dest / "peft-adapter"
        folder.mkdir()
        for p in parts:
            p.path.replace(folder / p.filename)
        return folder, "peft-adapter"
    raise UsageError("upload one adapter file, a PEFT folder as a .zip, or the folder's two files "
                     f"{' + '.join(PEFT_FILES)} (got {', '.join(names)})")


def _unzip(part: Part, dest: Path, limit: int) -> tuple[Path, str]:
    """Extract a PEFT folder (its two files, wherever they sit in the archive) or one .safetensors.

    Only those members are read, each by its base name (no path from the archive is ever used), and
    the decompressed bytes count against the same limit (a zip bomb stops at the limit)."""
    stem = safe_name(part.filename[:-4], default="peft-adapter")
    try:
        with zipfile.ZipFile(part.path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            by_name: dict[str, list[zipfile.ZipInfo]] = {}
            for m in members:
                by_name.setdefault(m.filename.replace("\\", "/").rsplit("/", 1)[-1], []).append(m)
            if all(len(by_name.get(n, [])) == 1 for n in PEFT_FILES):
                folder, wanted = dest / stem, [(by_name[n][0], n) for n in PEFT_FILES]
                folder.mkdir()
                out = folder
            else:
                tensors = [m for m in members if m.filename.lower().endswith(".safetensors")]
                if len(tensors) != 1:
                    raise BadAdapterError(part.filename, "zip holds no PEFT folder (adapter_config.json + "
                                          "adapter_model.safetensors) and not exactly one .safetensors file")
                name = safe_name(tensors[0].filename)
                folder, wanted, out = dest, [(tensors[0], name)], dest / name
            budget = limit
            for info, name in wanted:
                with zf.open(info) as src, open(folder / name, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        budget -= len(chunk)
                        if budget < 0:
                            raise UploadTooLargeError(f"{part.filename}: unpacks to more than {limit} bytes")
                        dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError) as e:
        raise BadAdapterError(part.filename, f"not a readable zip archive ({e})") from None
    return out, (stem if out is folder else out.name)


def remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
