"""Loaders for LoRA collections made elsewhere, read from local paths only (nothing is downloaded).

(a) The LoRA-WS Hub layout: Parquet, one row per adapter, one column per tensor, named like
    ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight`` and holding
    the flattened values, plus label columns (``category_label``, ``category_name``, ``num_images``,
    ``rank``, ``step_loss`` …). Rows are streamed in record batches, so a large file is never held
    whole in memory.
(b) A folder of adapters (PEFT folders or single files, symlinks allowed) plus a labels table
    (CSV with header ``name,label``, or Parquet with ``name``/``label`` or a collection manifest),
    ``name`` being a file or folder name inside the folder.
"""
from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lorasearch.adapters.family import infer_family
from lorasearch.adapters.formats import classify, normalize_stem
from lorasearch.errors import BadAdapterError, MissingError
from lorasearch.types import LoraAdapter, LoraModule

_TENSOR_COL = re.compile(r"\.(lora[._](down|up)|lora_[AB])(\.weight)?$")


def _is_tensor_column(name: str, typ: pa.DataType) -> bool:
    return bool(_TENSOR_COL.search(name)) and (pa.types.is_list(typ) or pa.types.is_large_list(typ)
                                                or pa.types.is_fixed_size_list(typ))


def _known_shapes() -> dict[str, tuple]:
    """Module shapes of the architectures the writers know (SD1.5 first: LoRA-WS is SD1.5)."""
    from lorasearch.adapters.writers import module_specs
    out: dict[str, tuple] = {}
    for arch in ("sdxl", "sd2", "sd15"):
        try:
            out.update(dict(module_specs(arch)))
        except Exception:  # an arch table that is not shipped is simply not used
            continue
    return out


def iter_lora_ws(path, batch_rows: int = 32, limit: int | None = None) -> Iterator[tuple[LoraAdapter, dict]]:
    """Yield ``(adapter, labels)`` per row of a LoRA-WS-layout Parquet file; ``labels`` holds every
    non-tensor column of the row (``category_label``, ``category_name``, ``num_images`` …)."""
    path = Path(path)
    if not path.exists():
        raise MissingError(f"{path}: no such file")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise BadAdapterError(path, f"not a Parquet file ({e})") from None
    schema = pf.schema_arrow
    tensors = [f.name for f in schema if _is_tensor_column(f.name, f.type)]
    if not tensors:
        raise BadAdapterError(path, "no LoRA tensor columns (expected names like "
                                    "'unet.….to_q.lora.down.weight' holding lists of floats)")
    pairs: dict[str, dict[str, str]] = {}
    for col in tensors:
        part = classify(col)
        if part is None or part.role not in ("A", "B"):
            raise BadAdapterError(path, f"column {col!r} is not a LoRA factor")
        pairs.setdefault(part.stem, {})[part.role] = col
    for stem, roles in pairs.items():
        if set(roles) != {"A", "B"}:
            raise BadAdapterError(path, f"module {stem}: only the {'down' if 'A' in roles else 'up'} half is present")
    shapes = _known_shapes()
    meta_cols = [f.name for f in schema if f.name not in set(tensors)]
    done = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        cols = batch.to_pydict() if meta_cols else {}
        for j in range(batch.num_rows):
            if limit is not None and done >= limit:
                return
            labels = {c: cols[c][j] for c in meta_cols}
            yield _row_adapter(path, done, batch, j, pairs, labels, shapes), labels
            done += 1


def _row_adapter(path: Path, row: int, batch: pa.RecordBatch, j: int, pairs, labels, shapes) -> LoraAdapter:
    where = f"{path}#row{row}"
    rank = labels.get("rank")
    alpha_col = labels.get("alpha", labels.get("lora_alpha"))
    mods, h = [], hashlib.sha256()
    for stem in sorted(pairs):
        name, _ = normalize_stem(stem, "diffusers-mid")
        down = batch.column(pairs[stem]["A"])[j].values.to_numpy(zero_copy_only=False).astype(np.float32)
        up = batch.column(pairs[stem]["B"])[j].values.to_numpy(zero_copy_only=False).astype(np.float32)
        if rank:
            r = int(rank)
        elif name in shapes:
            out, inp = shapes[name][0], int(np.prod(shapes[name][1:]))
            r = up.size // out if up.size % out == 0 else 0
            if r == 0 or down.size != r * inp:
                raise BadAdapterError(where, f"{stem}: sizes {down.size}/{up.size} do not fit shape {shapes[name]}")
        else:
            raise BadAdapterError(where, f"{stem}: no 'rank' column and an unknown module, cannot infer shapes")
        if down.size % r or up.size % r:
            raise BadAdapterError(where, f"{stem}: {down.size} and {up.size} values are not multiples of rank {r}")
        if not (np.isfinite(down).all() and np.isfinite(up).all()):
            raise BadAdapterError(where, f"{stem}: NaN or Inf values")
        A, B = down.reshape(r, -1), up.reshape(-1, r)
        alpha = float(alpha_col) if alpha_col is not None else float(r)
        mods.append(LoraModule(name, A, B, alpha / r, "F32", (B.shape[0], A.shape[1]), alpha))
        h.update(A.tobytes()); h.update(B.tobytes())
    return LoraAdapter(path=where, format="lora-ws-parquet", sha256=h.hexdigest(), family=infer_family(mods),
                       modules=mods, metadata={k: str(v) for k, v in labels.items() if not isinstance(v, list)})


def load_lora_ws(path, limit: int | None = None) -> tuple[list[LoraAdapter], list[dict]]:
    rows = list(iter_lora_ws(path, limit=limit))
    return [a for a, _ in rows], [l for _, l in rows]


def write_lora_ws(adapters: list[LoraAdapter], labels: list[dict], path) -> Path:
    """Write adapters in the LoRA-WS Hub layout (``<module>.lora.down.weight`` / ``.lora.up.weight``
    columns of flattened float32, scale folded into ``up`` so alpha = r; plus the label columns).
    All adapters must target the same modules with the same rank per module."""
    cols: dict[str, list] = {}
    for ad, lab in zip(adapters, labels):
        for m in ad.modules:
            cols.setdefault(f"{m.name}.lora.down.weight", []).append(m.A.astype(np.float32).ravel())
            cols.setdefault(f"{m.name}.lora.up.weight", []).append((m.B * m.scale).astype(np.float32).ravel())
        for k, v in lab.items():
            cols.setdefault(k, []).append(v)
    n = len(adapters)
    bad = [k for k, v in cols.items() if len(v) != n]
    if bad:
        raise ValueError(f"adapters differ in modules or label columns: {bad[:3]}")
    arrays = {k: (pa.array([x.tolist() for x in v], type=pa.list_(pa.float32()))
                  if k.endswith(".weight") else pa.array(v)) for k, v in cols.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)
    return path


# --------------------------------------------------------------------------------- (b)
# The ONE reader of labels tables and adapter folders (also behind `lorasearch eval`): one rule
# set, one set of error texts.
class BadLabelsError(BadAdapterError):
    """A labels table or manifest that cannot be used (exit 65, like any bad input file)."""


def read_label_table(path) -> dict[str, tuple[str, str | None]]:
    """``{name: (label, shots)}`` from a CSV (header with ``name`` and ``label``, optional ``shots``;
    other columns ignored) or a Parquet table (``name`` — or a manifest's ``path``, by file name — and
    ``label``, optional ``shots``). Names are unique: a name listed twice is refused."""
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"{path}: labels file not found")
    if path.suffix == ".parquet":
        try:
            t = pq.read_table(path).to_pydict()
        except (pa.ArrowException, OSError) as e:
            raise BadLabelsError(path, f"not a Parquet table ({' '.join(str(e).split())[:200]})") from None
        key = "name" if "name" in t else "path" if "path" in t else None
        if key is None or "label" not in t:
            raise BadLabelsError(path, f"labels table needs columns name (or path) and label, found {sorted(t)}")
        shots = t.get("shots") or [None] * len(t[key])
        rows = [(Path(str(n)).name if key == "path" else n, lbl, sh) for n, lbl, sh in zip(t[key], t["label"], shots)]
        header_line = 1
    else:
        try:
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                header = [(h or "").strip() for h in (reader.fieldnames or [])]
                reader.fieldnames = header
                raw = list(reader)
        except UnicodeDecodeError:
            raise BadLabelsError(path, "not UTF-8 text") from None
        except csv.Error as e:
            raise BadLabelsError(path, f"not a CSV file ({e})") from None
        if "name" not in header or "label" not in header:
            raise BadLabelsError(path, f"header must contain `name,label`, found {','.join(header)!r}")
        rows = [(r.get("name"), r.get("label"), r.get("shots")) for r in raw]
        header_line = 1
    if not rows:
        raise BadLabelsError(path, "no rows after the header")
    out: dict[str, tuple[str, str | None]] = {}
    for i, (name, label, shots) in enumerate(rows, start=header_line + 1):
        name = "" if name is None else str(name).strip()
        label = "" if label is None else str(label).strip()
        shots = None if shots is None or (isinstance(shots, float) and shots != shots) else (str(shots).strip() or None)
        if not name or not label:
            raise BadLabelsError(path, f"line {i}: empty name or label")
        if name in out:
            raise BadLabelsError(path, f"line {i}: {name!r} labelled twice ({out[name][0]!r}, {label!r})")
        out[name] = (label, shots)
    return out


def read_labels(path) -> dict[str, str]:
    """``{name: label}`` (see ``read_label_table``)."""
    return {n: lbl for n, (lbl, _shots) in read_label_table(path).items()}


def list_adapter_entries(folder) -> dict[str, Path]:
    """``{name: path}`` of the adapters directly inside ``folder``, sorted: PEFT folders and files with
    an adapter suffix (symlinks followed; hidden names skipped). A broken symlink is an error."""
    from lorasearch.adapters import reader

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingError(f"{folder}: folder not found")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():
            raise MissingError(f"{p}: broken symlink")
        if (p.is_dir() and (p / "adapter_config.json").is_file()) or \
                (not p.is_dir() and p.suffix.lower() in reader.ADAPTER_SUFFIXES):
            out[p.name] = p
    return out


def _some(names: list[str]) -> str:
    more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
    return f"{', '.join(names[:3])}{more}"


def check_labels(found: list[str], table: dict, labels, where: str) -> None:
    """The one rule for pairing adapters with a labels table: every adapter found has a label
    (else exit 65), every labelled name is found in ``where`` (else exit 66)."""
    unlabelled = [n for n in found if n not in table]
    if unlabelled:
        raise BadLabelsError(labels, f"no label for {len(unlabelled)} adapter(s): {_some(unlabelled)}")
    missing = sorted(set(table) - set(found))
    if missing:
        raise MissingError(f"{labels}: {len(missing)} name(s) not found in {where}: {_some(missing)}")


def load_labelled_folder(root, labels, strict: bool = True) -> list[tuple[LoraAdapter, str]]:
    """Every adapter directly inside ``root`` (PEFT folder or file, symlinks followed) with its label.
    ``strict``: a listed name with no adapter, or an adapter with no label, is an error."""
    from lorasearch.adapters import reader

    root = Path(root)
    entries = list_adapter_entries(root)
    table = read_labels(labels) if not isinstance(labels, dict) else labels
    where = labels if not isinstance(labels, dict) else f"{root} (labels)"
    if strict:
        check_labels(list(entries), table, where, str(root))
    return [(reader.load_adapter(entries[n]), table[n]) for n in sorted(entries) if n in table]
