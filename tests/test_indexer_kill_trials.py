"""The kill-trial harness itself (slow: real CLI children killed with SIGKILL; run with -m slow)."""
import pytest

from lorasearch.eval.bench.kill_trials import run, to_markdown


@pytest.mark.slow
def test_kill_trials_smoke(tmp_path):
    res = run(trials=1, seed=3, workdir=str(tmp_path), log=lambda m: None)
    assert res["failures"] == []
    assert all(st["killed"] == 1 for st in res["stats"].values())          # one SIGKILL per kind
    md = to_markdown(res, "test machine", 1.0)
    assert "| **all** |" in md and "failures" in md
    assert list(tmp_path.iterdir()) == []            # its temporary folders are cleaned up
