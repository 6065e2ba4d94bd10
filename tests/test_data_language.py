"""Language suite: task generators, the tiny collection end to end (CLI), and the bundled demo."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lorasearch.adapters import load_adapter
from lorasearch.data.manifest import read_manifest
from lorasearch.data.tasks import TASKS, get_task
from lorasearch.errors import UnavailableError, UsageError

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
torch.set_num_threads(1)


def test_at_least_eight_tasks_of_different_kinds():
    assert len(TASKS) >= 8 and len({t.kind for t in TASKS.values()}) == len(TASKS)
    for t in TASKS.values():
        train, test = t.split(0, 60, 30)
        assert len(train) == 60 and len(test) == 30, t.name
        assert {y for _, y in train} == set(range(len(t.labels))), t.name     # every class present
        assert not {x for x, _ in train} & {x for x, _ in test}, t.name        # held-out is new text
        assert t.split(0, 60, 30) == (train, test)                            # deterministic
        assert t.sample(random.Random(1), 6) != t.sample(random.Random(2), 6)
    with pytest.raises(UsageError, match="unknown task"):
        get_task("nope")


def test_task_labels_follow_their_rule():
    rng = random.Random(0)
    for text, y in get_task("parity").sample(rng, 20):
        assert int(text.split()[-1]) % 2 == y
    for text, y in get_task("compare").sample(rng, 20):
        a, _, b = text.split()
        assert int(int(b) > int(a)) == y
    for text, y in get_task("sorted").sample(rng, 20):
        xs = list(map(int, text.split()))
        assert (xs == sorted(xs)) == bool(y)


def test_tiny_collection_via_cli(tmp_path):
    from lorasearch.cli_data import data

    res = CliRunner().invoke(data, ["make", "language", "--out", str(tmp_path / "c"), "--tiny",
                                    "--device", "cpu", "--task", "sentiment", "--n", "2"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["adapters"] == 3 and summary["suite"] == "language"
    rows = read_manifest(tmp_path / "c")
    assert [r["role"] for r in rows] == ["gallery", "gallery", "query"]
    assert rows[2]["shots"] == 1 and rows[0]["shots"] is None
    with open(tmp_path / "c" / "labels.csv") as f:
        labels = dict(list(csv.reader(f))[1:])
    for r in rows:
        ad = load_adapter(tmp_path / "c" / r["path"])
        assert ad.family == "minilm" and len(ad.modules) == 12
        assert {m.rank for m in ad.modules} == {r["rank"]}
        assert ad.modules[0].scale == pytest.approx(r["alpha"] / r["rank"])
        assert ad.modules[0].dtype == "F16"
        assert labels[Path(r["path"]).name] == "sentiment"
        assert len(r["loss_curve"]) == r["hyperparameters"]["steps"] and 0 <= r["accuracy"] <= 1
        assert any(abs(m.B).max() > 0 for m in ad.modules)       # B moved away from its zero init


def test_make_rejects_bad_input(tmp_path, monkeypatch):
    from lorasearch import cli_data

    with pytest.raises(UsageError, match="unknown suite"):
        cli_data.make("audio", tmp_path)
    with pytest.raises(UsageError, match="--n"):
        cli_data.make("language", tmp_path, n=0)
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        cli_data.make("language", tmp_path / "f")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnavailableError, match="no CUDA"):
        cli_data.make("language", tmp_path / "x", device="cuda")
    assert cli_data.resolve_device("auto") == "cpu"


@pytest.mark.skipif(not (DEMO / "labels.csv").exists(), reason="demo collection not generated")
def test_demo_collection_is_real_and_small():
    with open(DEMO / "labels.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["name", "label"]
    labels = dict(rows[1:])
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size < 5 * 2**20
    names = {p.name for sub in ("gallery", "queries") for p in (DEMO / sub).iterdir()}
    assert names == set(labels)
    formats = set()
    for name in labels:
        path = DEMO / "gallery" / name
        ad = load_adapter(path if path.exists() else DEMO / "queries" / name)
        assert ad.family == "minilm" and len(ad.modules) == 12
        formats.add(ad.format)
    assert formats >= {"peft", "peft-file"}
    man = read_manifest(DEMO)
    assert {r["task"] for r in man} == {"sentiment", "language", "topic", "parity"}
    for r in man:
        chance = 1 / len(get_task(r["task"]).labels)
        if r["role"] == "gallery":
            assert r["accuracy"] > chance + 0.2, r["id"]


def test_cli_errors_are_one_line_with_exit_codes(tmp_path, monkeypatch):
    from lorasearch.cli_data import data

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(data, ["make", "language", "--out", str(tmp_path / "c"), "--device", "cuda"])
    assert res.exit_code == 69 and "no CUDA" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(data, ["make", "language", "--out", str(tmp_path / "c"), "--n", "0"])
    assert res.exit_code == 2 and "--n" in res.output
    res = CliRunner().invoke(data, ["make", "music", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2


def test_diffusion_suite_is_delegated(tmp_path, monkeypatch):
    """`make diffusion` calls lorasearch.data.diffusion.make_collection(out, n, seed, device, tiny)."""
    import types

    from lorasearch import cli_data

    calls = []
    fake = types.SimpleNamespace(make_collection=lambda *a: calls.append(a) or tmp_path / "m.parquet")
    real = cli_data.importlib.import_module
    monkeypatch.setattr(cli_data.importlib, "import_module",
                        lambda name: fake if name == "lorasearch.data.diffusion" else real(name))
    assert cli_data.make("diffusion", tmp_path / "d", n=3, seed=5, device="cpu", tiny=True) == \
        {"manifest": str(tmp_path / "m.parquet")}
    assert calls == [(tmp_path / "d", 3, 5, "cpu", True)]

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    monkeypatch.setattr(cli_data.importlib, "import_module", missing)
    with pytest.raises(UnavailableError, match="diffusion suite"):
        cli_data.make("diffusion", tmp_path / "d", device="cpu")
