"""A run as a service, end to end: `sm-dist ctl` scales the rollout workers 2 -> 3 -> 1 while the
learner trains, as a service (run.total_steps: null). The added worker's first rows carry the weights
version it joined with (or a later one); no acknowledged row is lost or written twice; training never
pauses for the scaling. Meanwhile a data file dropped into data.watch_dir reaches the expert buffer
within a step or two, and a bad one is reported and skipped; pause holds the learner, resume and
checkpoint-now work, and `stop` ends the service with exit 0 and a checkpoint of its last step."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_pipeline import FAST, NO_HELDOUT, ROOT, TINY, _metrics, _start, _wait, ray_tmp  # noqa: F401

pytestmark = pytest.mark.slow


def test_scale_workers_2_3_1_while_training(tmp_path, ray_tmp, monkeypatch):  # noqa: F811
    # the run's own inductor cache: the session's shared one under /tmp once vanished under a running
    # learner (InductorError: FileNotFoundError), on a machine shared with other test sessions
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    run = tmp_path / "run"
    proc = _start(tmp_path, ray_tmp, [sys.executable, "-m", "sm_dist", "train", TINY, f"run.run_dir={run}",
                                      "run.total_steps=null", "learner.schedule=constant", NO_HELDOUT, "run.num_cpus=3",
                                      "run.checkpoint_every=100",
                                      f"data.watch_dir={tmp_path / 'incoming'}", "data.watch_poll_s=0.05",
                                      *FAST[:3]])  # fmt: skip
    _wait(
        lambda: (run / "api.json").exists() and _metrics(run) and _metrics(run)[-1]["step"] >= 5,
        "step 5",
        proc,
    )
    watch_steps = _drop_watched_files(tmp_path, run, proc)
    v_asked, v_join, step_down = _scale_up_then_down(run, proc)
    ck = _pause_resume_checkpoint(run)
    _stop_once_w0_is_alone(run, proc)
    summary = json.loads((run / "summary.json").read_text())
    total = summary["step"]
    assert total >= ck["step"] and summary["last_checkpoint"].endswith(f"step-{total:08d}")
    assert [r["step"] for r in _metrics(run)] == list(range(1, total + 1))  # training never stopped
    f = _check_rows(run, summary, v_join)
    figures = {"v_asked": v_asked, "v_join": v_join, "w2_first_version": f["w2_first_version"],
               "step_scaled_down": step_down, "rows": f["rows"], "added_rows": f["added_rows"],
               "rows_per_worker": f["rows_per_worker"], "watch_steps": watch_steps}  # fmt: skip
    print("scaling figures:", json.dumps(figures))


def _drop_watched_files(tmp_path: Path, run: Path, proc) -> list[int]:
    """A bad and a good file into data.watch_dir: the good one is taken between two steps, the bad one
    skipped. Returns [the step seen before the drop, the step it was taken at]."""
    step_drop = _metrics(run)[-1]["step"]
    (tmp_path / "incoming" / "bad.jsonl").write_text("not json\n")
    good = "".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(7))
    (tmp_path / "incoming" / "new.jsonl.tmp").write_text(good)
    (tmp_path / "incoming" / "new.jsonl.tmp").rename(tmp_path / "incoming" / "new.jsonl")
    log = run / "driver.log"
    _wait(lambda: "new.jsonl: 7 expert rows added" in log.read_text(), "the watched file", proc, 60)
    step_added = json.loads((run / "watch_taken.json").read_text())["new.jsonl"]["step"]  # when it was taken
    # taken between two steps: at most one step after the last one this test saw before dropping it
    # (steps logged meanwhile only add the lag of reading metrics.jsonl)
    assert step_added - step_drop <= 2, (step_drop, step_added)
    assert "bad.jsonl skipped" in log.read_text()
    return [step_drop, step_added]


def _scale_up_then_down(run: Path, proc) -> tuple[int, int, int]:
    """`ctl scale 3`: w2 joins with the current weights and writes rows; `ctl scale 1`: w0 alone.
    Returns (the version live when asked, the version w2 joined with, the step scaled down at)."""
    from sm_dist.buffer import read_run_buffer
    from sm_dist.service.ctl import call

    log = run / "driver.log"
    v_asked = call(run, "status")["live"]["version"]
    assert call(run, "scale", 3)["joining"] == 1
    joined = _wait(lambda: re.search(r"rollout worker w2 joins with weights version (\d+)", log.read_text()),
                   "w2 to join", proc)  # fmt: skip
    v_join = int(joined.group(1))
    assert v_join >= v_asked
    _wait(lambda: "w2" in call(run, "status")["live"]["workers"], "w2 live", proc)
    _wait(
        lambda: any(w == "w2" for w in read_run_buffer(run).column("worker_id").to_pylist()), "w2 rows", proc
    )
    step_down = call(run, "status")["live"]["step"]
    out = call(run, "scale", 1)
    assert out["workers"] == 1 and out["names"] == ["w0"]
    return v_asked, v_join, step_down


def _pause_resume_checkpoint(run: Path) -> dict:
    """pause holds the learner; resume; checkpoint-now. Returns the checkpoint's answer."""
    from sm_dist.service.ctl import call

    assert call(run, "pause")["paused"] and call(run, "health")["paused"]
    paused_at = _metrics(run)[-1]["step"]
    time.sleep(2)
    assert _metrics(run)[-1]["step"] == paused_at  # no step while paused
    assert not call(run, "resume")["paused"]
    ck = call(run, "checkpoint")
    assert Path(ck["checkpoint"], "model", "config.json").exists() and ck["step"] >= paused_at
    return ck


def _stop_once_w0_is_alone(run: Path, proc) -> None:
    """Once w0 has written rows since w1's last one, `ctl stop` ends the service with exit 0."""
    from sm_dist.buffer import read_run_buffer
    from sm_dist.service.ctl import call

    log = run / "driver.log"

    def w0_alone():  # w0 has written rows since w1's last one
        rows = read_run_buffer(run).to_pylist()
        last = {
            w: max((r["created_at"] for r in rows if r["worker_id"] == w), default=None) for w in ("w0", "w1")
        }
        return "rollout worker w1 removed" in log.read_text() and last["w0"] > last["w1"]

    _wait(w0_alone, "w0's rows after w1 left", proc)
    assert call(run, "stop")["stopping"]
    log_text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log_text[-3000:]


def _check_rows(run: Path, summary: dict, v_join: int) -> dict:
    """The buffer after the stop: no acknowledged row lost or written twice, w2's rows from the
    version it joined with, w0 re-sharded and alone at the end, the watched rows once in the expert
    buffer. Returns the figures the test prints."""
    from sm_dist.buffer import read_run_buffer

    rows = read_run_buffer(run).to_pylist()
    buf = summary["buffer"]
    assert buf["evicted_rows"] == 0 and len(rows) == buf["added_rows"]  # no acknowledged row lost
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids))  # none written twice
    by_worker = {w: [r["policy_version"] for r in rows if r["worker_id"] == w] for w in ("w0", "w1", "w2")}
    assert (
        by_worker["w2"] and min(by_worker["w2"]) >= v_join
    )  # its first rollouts: the version it joined with
    w1_rows = sorted((r for r in rows if r["worker_id"] == "w1"), key=lambda r: r["created_at"])
    w1_first = {tuple(r["prompt_ids"]) for r in w1_rows[:16]}  # from w1's first shard (every 2nd from 1)
    assert any(
        tuple(r["prompt_ids"]) in w1_first for r in rows if r["worker_id"] == "w0"
    )  # w0 was re-sharded
    text = (run / "driver.log").read_text()
    assert "rollout worker w2 removed" in text and "rollout worker w1 removed" in text
    last_w1 = max(r["created_at"] for r in rows if r["worker_id"] == "w1")
    last_w0 = max(r["created_at"] for r in rows if r["worker_id"] == "w0")
    assert last_w0 > last_w1  # w0 went on alone
    expert = read_run_buffer(run / "expert").column("sample_id").to_pylist()
    assert sum(i.startswith("watch") for i in expert) == 7 and len(expert) == len(set(expert))
    taken = json.loads((run / "watch_taken.json").read_text())
    assert taken["new.jsonl"]["rows"] == 7 and "error" in taken["bad.jsonl"]
    return {"w2_first_version": min(by_worker["w2"]), "rows": len(rows), "added_rows": buf["added_rows"],
            "rows_per_worker": {w: len(v) for w, v in by_worker.items()}}  # fmt: skip
