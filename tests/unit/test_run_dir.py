"""A run directory never loses work (issue 20): a fresh run does not reuse one that holds a run
(`run.overwrite` moves it aside), a resume continues the run's saved config, keeps the config's history,
and leaves no step twice in the metrics (jsonl and TensorBoard)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sm_dist.config import ConfigError, dump_config, load_config, load_resume_config
from sm_dist.orchestrator.storage import claim_fresh_run_dir, keep_config_history, set_aside_history
from sm_dist.service.metrics import MetricsLogger, read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")


def _saved_run(tmp_path: Path, *over: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(TINY, [f"run.run_dir={run}", *over])
    (run / "config.yaml").write_text(dump_config(cfg))
    return run


def test_a_fresh_run_on_a_used_run_dir_is_refused_or_moved_aside_never_deleted(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run / "checkpoints" / "step-00000004" / "w").write_text("weights")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=r"already holds a run \(1 checkpoint.*1 metric rows"):
        claim_fresh_run_dir(run, overwrite=False)
    assert (run / "checkpoints" / "step-00000004" / "w").read_text() == "weights"
    aside = claim_fresh_run_dir(run, overwrite=True)
    assert aside is not None and aside.name.startswith("run.old-") and not run.exists()
    assert (aside / "checkpoints" / "step-00000004" / "w").read_text() == "weights"
    assert claim_fresh_run_dir(run, overwrite=False) is None  # nothing there now


def test_a_failed_start_that_left_only_its_config_and_logs_does_not_block_a_fresh_run(tmp_path):
    run = _saved_run(tmp_path)
    (run / "driver.log").write_text("vLLM refused the settings\n")
    assert claim_fresh_run_dir(run, overwrite=False) is None


def test_resume_without_a_config_continues_the_saved_one_with_overrides_on_top(tmp_path):
    run = _saved_run(tmp_path, "run.total_steps=600", "learner.lr=2e-4")
    cfg = load_resume_config(str(run), None, [])
    assert cfg.run.total_steps == 600 and cfg.learner.lr == 2e-4  # not the file's defaults
    assert load_resume_config(str(run), None, ["run.total_steps=900"]).run.total_steps == 900
    moved = tmp_path / "moved"
    run.rename(moved)  # a run directory that moved keeps its own model folder
    cfg = load_resume_config(str(moved), None, [])
    assert cfg.run.run_dir == str(moved) and cfg.model.dir == str(moved / "model")


def test_resume_with_the_original_config_file_is_refused_where_it_differs(tmp_path):
    run = _saved_run(tmp_path, "run.total_steps=600")
    with pytest.raises(
        ConfigError, match=r"run.total_steps \(600 saved, \d+ in the file\).*run.total_steps="
    ):
        load_resume_config(str(run), TINY, [])
    # the same file with the overrides the run started with: nothing differs, the run goes on
    assert load_resume_config(str(run), TINY, ["run.total_steps=600"]).run.total_steps == 600
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty has no saved config.yaml"):
        load_resume_config(str(tmp_path / "empty"), None, [])


def test_the_saved_config_keeps_its_history(tmp_path):
    run = _saved_run(tmp_path)
    first = (run / "config.yaml").read_text()
    assert keep_config_history(run, first, 50) is None  # unchanged: nothing to keep
    prev = keep_config_history(run, first.replace("total_steps", "total_steps_x"), 50)
    assert prev.name == "config.before-step-50.yaml" and prev.read_text() == first
    (run / "config.yaml").write_text("new")
    assert keep_config_history(run, "newer", 50).name == "config.before-step-50-2.yaml"


def test_metrics_continue_from_the_resumed_step_without_duplicates(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 11):
        log.log(step, {"loss/total": float(step)})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "loss/tot')  # a run killed mid-write
    assert set_aside_history(tmp_path, 6) == 5  # steps 7..10 and the torn line
    again = MetricsLogger(tmp_path, tensorboard=True, resume_step=6)
    for step in range(7, 13):
        again.log(step, {"loss/total": 100.0 + step})
    again.close()
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(1, 13))
    abandoned = [
        json.loads(x)["step"] for x in (tmp_path / "metrics.abandoned.jsonl").read_text().splitlines()[:4]
    ]
    assert abandoned == [7, 8, 9, 10]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("loss/total")
    assert [e.step for e in events] == list(range(1, 13))  # purged past step 6, then redone
    assert [e.value for e in events][6:] == [100.0 + s for s in range(7, 13)]


def test_the_saved_config_is_valid_yaml_of_the_resolved_config(tmp_path):
    run = _saved_run(tmp_path)
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["run_dir"] == str(run)
