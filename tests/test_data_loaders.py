"""Loaders for external collections: LoRA-WS Hub Parquet layout and labelled adapter folders."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorasearch.adapters import delta_weight, load_adapter, random_adapter, write_adapter
from lorasearch.data.loaders import iter_lora_ws, load_labelled_folder, load_lora_ws, read_labels, write_lora_ws
from lorasearch.data.manifest import read_manifest, write_manifest
from lorasearch.errors import BadAdapterError, MissingError

TARGETS = r"attn[12]\.to_[qv]$"          # LoRA-WS: to_q and to_v of all 32 attention blocks


def _ws_file(tmp_path, n=5, with_rank=True):
    ads = [random_adapter("sd15", rank=1, targets=TARGETS, seed=i, alpha=1.0) for i in range(n)]
    labels = [dict(category_label=i % 3, category_name=["dog", "car", "bird"][i % 3], num_images=4 + i,
                   step_loss=[0.5, 0.4, 0.3], **({"rank": 1} if with_rank else {})) for i in range(n)]
    return ads, labels, write_lora_ws(ads, labels, tmp_path / "loras.parquet")


def test_lora_ws_layout_roundtrip(tmp_path):
    ads, labels, path = _ws_file(tmp_path)
    cols = pq.read_schema(path).names
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in cols
    assert sum(c.endswith(".weight") for c in cols) == 128      # 64 modules × (down, up)
    got, lab = load_lora_ws(path)
    assert len(got) == 5 and [l["category_name"] for l in lab] == ["dog", "car", "bird", "dog", "car"]
    assert lab[0]["num_images"] == 4 and lab[0]["step_loss"] == pytest.approx([0.5, 0.4, 0.3])
    for a, b in zip(ads, got):
        assert b.family == "sd1" and len(b.modules) == 64
        assert sum(m.A.size + m.B.size for m in b.modules) == 99_648        # LoRA-WS's count
        for ma in a.modules:
            mb = b.module(ma.name)
            assert mb is not None and mb.rank == 1
            np.testing.assert_allclose(mb.A, ma.A, rtol=1e-6)
            np.testing.assert_allclose(mb.B * mb.scale, ma.B * ma.scale, rtol=1e-6)
    m = got[0].modules[5]
    np.testing.assert_allclose(delta_weight(m), delta_weight(ads[0].module(m.name)), rtol=1e-5, atol=1e-8)


def test_lora_ws_without_rank_column_uses_module_shapes(tmp_path):
    ads, _, path = _ws_file(tmp_path, n=2, with_rank=False)
    got, _ = load_lora_ws(path, limit=1)
    assert len(got) == 1
    m = got[0].module("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v")
    assert m.A.shape == (1, 768) and m.B.shape == (1280, 1)


def test_lora_ws_bad_inputs(tmp_path):
    with pytest.raises(MissingError):
        list(iter_lora_ws(tmp_path / "nope.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BadAdapterError, match="junk.parquet"):
        list(iter_lora_ws(tmp_path / "junk.parquet"))
    pq.write_table(pa.table({"category_label": [1]}), tmp_path / "labels_only.parquet")
    with pytest.raises(BadAdapterError, match="no LoRA tensor columns"):
        list(iter_lora_ws(tmp_path / "labels_only.parquet"))
    half = pa.table({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight":
                     pa.array([[0.1] * 320], type=pa.list_(pa.float32())), "rank": [1]})
    pq.write_table(half, tmp_path / "half.parquet")
    with pytest.raises(BadAdapterError, match="only the down half"):
        list(iter_lora_ws(tmp_path / "half.parquet"))
    nan = pa.table({"unet.x.to_q.lora.down.weight": pa.array([[float("nan")] * 4], type=pa.list_(pa.float32())),
                    "unet.x.to_q.lora.up.weight": pa.array([[0.1] * 4], type=pa.list_(pa.float32())), "rank": [1]})
    pq.write_table(nan, tmp_path / "nan.parquet")
    with pytest.raises(BadAdapterError, match="NaN"):
        list(iter_lora_ws(tmp_path / "nan.parquet"))


def _folder(tmp_path):
    g = tmp_path / "gallery"
    for i, fmt in enumerate(["peft", "peft-file", "peft"]):
        ad = random_adapter("minilm", rank=4, targets=["query", "value"], seed=i, alpha=8.0)
        name = f"a{i}" + (".safetensors" if fmt == "peft-file" else "")
        write_adapter(ad, g / name, fmt)
    (tmp_path / "real").mkdir()
    write_adapter(random_adapter("minilm", rank=2, targets=["value"], seed=9), tmp_path / "real" / "b", "peft")
    (g / "link").symlink_to(tmp_path / "real" / "b")
    return g


def test_labelled_folder_csv_and_parquet(tmp_path):
    g = _folder(tmp_path)
    (tmp_path / "labels.csv").write_text("name,label\na0,x\na1.safetensors,y\na2,x\nlink,z\n")
    got = load_labelled_folder(g, tmp_path / "labels.csv")
    assert [(a.format, lbl) for a, lbl in got] == [("peft", "x"), ("peft-file", "y"), ("peft", "x"), ("peft", "z")]
    assert all(a.family == "minilm" for a, _ in got)
    ref = load_adapter(g / "a0")
    np.testing.assert_array_equal(got[0][0].modules[0].A, ref.modules[0].A)
    pq.write_table(pa.table({"name": ["a0", "a1.safetensors", "a2", "link"], "label": ["1", "2", "1", "3"]}),
                   tmp_path / "labels.parquet")
    assert [lbl for _, lbl in load_labelled_folder(g, tmp_path / "labels.parquet")] == ["1", "2", "1", "3"]


def test_labelled_folder_errors(tmp_path):
    g = _folder(tmp_path)
    (tmp_path / "l1.csv").write_text("file,class\na0,x\n")
    with pytest.raises(BadAdapterError, match="header must contain `name,label`"):
        read_labels(tmp_path / "l1.csv")
    (tmp_path / "l2.csv").write_text("name,label\na0,x\na1.safetensors,y\na2,x\nlink,z\nghost,y\n")
    with pytest.raises(MissingError, match="1 name\\(s\\) not found in .*ghost"):
        load_labelled_folder(g, tmp_path / "l2.csv")
    (tmp_path / "l3.csv").write_text("name,label\na0,x\n")
    with pytest.raises(BadAdapterError, match="no label for 3 adapter.*a1.safetensors"):
        load_labelled_folder(g, tmp_path / "l3.csv")
    assert len(load_labelled_folder(g, tmp_path / "l3.csv", strict=False)) == 1
    (tmp_path / "l4.csv").write_text("name,label\na0,x\na0,y\n")
    with pytest.raises(BadAdapterError, match="'a0' labelled twice"):
        read_labels(tmp_path / "l4.csv")
    with pytest.raises(MissingError):
        load_labelled_folder(tmp_path / "nope", tmp_path / "l3.csv")


def test_manifest_roundtrip(tmp_path):
    rows = [dict(id="a", path="gallery/a", suite="language", label="sentiment", task="sentiment",
                 role="gallery", shots=None, format="peft", rank=8, alpha=16.0,
                 hyperparameters={"lr": 1e-3, "steps": 60}, loss_curve=[0.7, 0.2], accuracy=0.95,
                 test_loss=0.1),
            dict(id="q", path="queries/q", suite="language", label="topic", role="query", shots=8,
                 hyperparameters={"lr": 2e-3}, loss_curve=[1.0])]
    p = write_manifest(rows, tmp_path)
    assert p.name == "manifest.parquet"
    back = read_manifest(tmp_path)
    assert back[0]["hyperparameters"] == {"lr": 1e-3, "steps": 60}
    assert back[0]["loss_curve"] == pytest.approx([0.7, 0.2]) and back[1]["shots"] == 8
    assert back[1]["accuracy"] is None and back[1]["variant_of"] is None
    assert pq.read_schema(p).field("loss_curve").type == pa.list_(pa.float32())
    with pytest.raises(MissingError):
        read_manifest(tmp_path / "none")
