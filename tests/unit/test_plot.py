"""`sm-dist plot`: PNG curves from metrics.jsonl, tolerant of a truncated last line only."""

import json

import pytest

from sm_dist.cli import main
from sm_dist.eval.plot import plot_run, read_metrics


def _write(run, lines):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_writes_a_png_per_logged_panel(tmp_path):
    rows = [{"step": s, "loss/total": 10 - s, "loss/bc": 11 - s, "sync/version": s // 2} for s in range(1, 6)]
    _write(tmp_path / "run", [json.dumps(r) for r in rows] + ['{"step": 6, "loss/to'])  # killed mid-write
    paths = plot_run(tmp_path / "run")
    assert sorted(p.name for p in paths) == ["loss.png", "sync.png"]  # panels without data are skipped
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    with pytest.raises(SystemExit) as e:
        main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert e.value.code == 0 and (tmp_path / "out" / "loss.png").exists()


def test_bad_metrics_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        read_metrics(tmp_path / "nope")
    _write(tmp_path / "bad", ['{"step": 1}', "garbage", '{"step": 2}'])
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(tmp_path / "bad")
