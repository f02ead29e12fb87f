"""Metrics sinks: jsonl always, TensorBoard, and W&B (offline mode, a real wandb run on disk)."""

from __future__ import annotations

import pytest

from sm_dist.service.metrics import MetricsLogger, read_metrics


def test_jsonl_and_non_finite_values(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, {"loss/total": 2.5, "bad": float("nan")})
    log.close()
    (row,) = read_metrics(tmp_path)
    assert row["step"] == 1 and row["loss/total"] == 2.5 and row["bad"] is None


def test_wandb_offline_run_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    opts = {"project": "sm-dist-test", "entity": None, "mode": "offline"}
    log = MetricsLogger(tmp_path, tensorboard=False, wandb=opts, config={"learner": {"lr": 1e-3}})
    log.log(1, {"loss/total": 3.0})
    log.log(2, {"loss/total": 2.0})
    log.close()
    run_id = (tmp_path / "wandb_run_id").read_text()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert list(runs[0].glob("*.wandb")), "no W&B event file written"

    again = MetricsLogger(tmp_path, tensorboard=False, wandb=opts)  # --resume: same W&B run id
    again.log(3, {"loss/total": 1.0})
    again.close()
    assert (tmp_path / "wandb_run_id").read_text() == run_id
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_wandb_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RuntimeError, match=r"pip install 'sm-dist\[wandb\]'"):
        MetricsLogger(tmp_path, tensorboard=False, wandb={"project": "p"})
