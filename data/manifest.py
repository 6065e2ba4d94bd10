"""``manifest.parquet``: one row per adapter of a collection, written and read with pyarrow.

Parquet (not the SQLite catalog) because a manifest is a dataset description that is written
once and read by analysis tools; its schema is fixed here so every suite writes the same columns.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lorasearch.errors import BadAdapterError, MissingError

SCHEMA = pa.schema([
    ("id", pa.string()),               # unique within the collection
    ("path", pa.string()),             # relative to the collection root
    ("suite", pa.string()),            # language | diffusion | ...
    ("label", pa.string()),            # the retrieval label (task, or leaf class)
    ("task", pa.string()),             # language task name (null for diffusion)
    ("superclass", pa.string()),       # diffusion superclass (null for language)
    ("leaf", pa.string()),             # diffusion leaf class (null for language)
    ("role", pa.string()),             # gallery | query
    ("shots", pa.int32()),             # examples per class for few-shot runs, null = full data
    ("format", pa.string()),           # peft | peft-file | diffusers | kohya
    ("rank", pa.int32()),
    ("alpha", pa.float32()),           # lora_alpha as the file declares it (r for bare files: scale folded into B)
    ("hyperparameters", pa.string()),  # JSON object with every setting of the run
    ("loss_curve", pa.list_(pa.float32())),
    ("accuracy", pa.float32()),        # held-out accuracy (classification suites)
    ("test_loss", pa.float32()),       # held-out loss
    ("variant_of", pa.string()),       # id of the adapter this one re-encodes (same ΔW), else null
    ("lf", pa.string()),               # language-x: labelling function (null elsewhere)
    ("pool", pa.string()),             # language-x: text pool
    ("targets", pa.string()),          # language-x: adapted modules (qv | v | qkv)
    ("learned", pa.bool_()),           # held-out accuracy clearly above chance (null = not judged)
])
MANIFEST = "manifest.parquet"


def _row(r: dict) -> dict:
    r = {k: r.get(k) for k in SCHEMA.names}
    if isinstance(r["hyperparameters"], dict):
        r["hyperparameters"] = json.dumps(r["hyperparameters"], sort_keys=True)
    return r


def write_manifest(rows: list[dict], path) -> Path:
    """Write rows (dicts with the schema's keys; missing keys are null) to ``path``
    (a ``.parquet`` file, or a folder that then gets ``manifest.parquet``)."""
    path = Path(path)
    if path.suffix != ".parquet":
        path = path / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([_row(r) for r in rows], schema=SCHEMA)
    pq.write_table(table, path, compression="zstd")
    return path


def read_manifest(path, require=("id", "path", "label", "role")) -> list[dict]:
    """Rows as dicts, ``hyperparameters`` decoded back into a dict. The one manifest reader (training,
    ``eval --collection``); ``require``: the columns the caller needs."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise MissingError(f"{path}: no manifest")
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise BadAdapterError(path, f"not a readable Parquet manifest ({' '.join(str(e).split())[:200]})") from None
    missing = set(require) - set(rows[0] if rows else SCHEMA.names)
    if missing:
        raise BadAdapterError(path, f"manifest lacks columns {sorted(missing)}")
    for i, r in enumerate(rows):
        if isinstance(r.get("hyperparameters"), str):
            try:
                r["hyperparameters"] = json.loads(r["hyperparameters"])
            except (ValueError, RecursionError):
                raise BadAdapterError(path, f"row {i}: hyperparameters is not valid JSON") from None
    return rows
