"""The index benchmark runs end to end through the public API and reports consistent numbers."""
import pytest

from lorasearch.eval.bench_index import format_markdown, run


def test_bench_index_smoke(tmp_path):
    rows = run(sizes=(300, 1000), dim=32, n_queries=5, k=4, device="cpu", workdir=str(tmp_path),
               bandwidth_bytes=16 << 20)
    assert [r["n"] for r in rows] == [300, 1000]
    for r in rows:
        assert r["device"] == "cpu" and r["bandwidth_GBps"] > 0
        assert 0 < r["single_median_ms"] <= r["single_p95_ms"]
        assert r["bound_ms"] > 0 and r["single_ratio"] == pytest.approx(r["single_median_ms"] / r["bound_ms"])
        assert r["add_per_s"] > 0 and r["disk_MB"] > 0
    table = format_markdown(rows)
    assert "| 1,000 | 32 | cpu |" in table and "bandwidth" in table
    assert list(tmp_path.iterdir()) == []          # the temporary indexes are cleaned up


def test_bench_index_factory_reports_recall(tmp_path):
    from lorasearch.eval.bench_index import format_ann_markdown
    rows = run(sizes=(1000,), dim=16, n_queries=20, k=5, device="cpu", workdir=str(tmp_path),
               bandwidth_bytes=16 << 20, factory="IVF16,Flat", data="clustered", nprobes=(1, 16))
    (r,) = rows
    assert r["factory"] == "IVF16,Flat" and r["index"] == "IVF16,Flat" and r["build_s"] > 0
    assert [p["knob"] for p in r["sweep"]] == ["default", "nprobe=1", "nprobe=16"]
    assert r["sweep"][2]["recall"] == pytest.approx(1.0)          # every list probed: exact
    assert r["sweep"][1]["recall"] < 1.0 and 0 < r["recall_at_k"] <= 1
    flat = run(sizes=(300,), dim=16, n_queries=5, k=4, device="cpu", workdir=str(tmp_path),
               bandwidth_bytes=16 << 20, nprobes=(4,))[0]
    assert flat["factory"] == "Flat" and flat["sweep"][0]["recall"] == pytest.approx(1.0)
    assert "| 1,000 | 16 | clustered | IVF16,Flat | IVF16,Flat |" in format_ann_markdown(rows)
