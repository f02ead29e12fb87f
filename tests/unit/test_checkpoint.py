"""Run-checkpoint folders: commit/prune, and the pinned model a resumed run starts its actors on."""

from __future__ import annotations

import json
import shutil

from sm_dist.learner import checkpoint as ckpt


def _checkpoint(run, step: int, weights: bytes) -> None:
    tmp = ckpt.begin(run, step)
    (tmp / "model").mkdir()
    (tmp / "model" / "model.safetensors").write_bytes(weights)
    (tmp / "model" / "tokenizer.json").write_text("{}")
    ckpt.commit(tmp, {"step": step}, run, keep_last=2)


def test_commit_prunes_to_keep_last_and_reads_back(tmp_path):
    for step in (10, 20, 30):
        _checkpoint(tmp_path, step, b"w%d" % step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    last = ckpt.latest_checkpoint(tmp_path)
    assert ckpt.read_run_state(last) == {"step": 30}
    assert not list(ckpt.checkpoints_dir(tmp_path).glob("*.tmp"))


def test_pinned_model_outlives_the_pruned_checkpoint(tmp_path):
    _checkpoint(tmp_path, 10, b"weights-10")
    pinned = ckpt.pin_model(ckpt.latest_checkpoint(tmp_path), tmp_path)
    assert pinned == tmp_path / "resumed-model"
    for step in (20, 30):  # keep_last=2 prunes step-10, the checkpoint the run resumed from
        _checkpoint(tmp_path, step, b"weights-%d" % step)
    assert not (ckpt.checkpoints_dir(tmp_path) / "step-00000010").exists()
    assert (pinned / "model.safetensors").read_bytes() == b"weights-10"
    assert json.loads((pinned / "tokenizer.json").read_text()) == {}
    # a later resume pins its own checkpoint in the same place; nothing of the old one is left
    (pinned / "stale.txt").write_text("x")
    again = ckpt.pin_model(ckpt.latest_checkpoint(tmp_path), tmp_path)
    assert again == pinned and (pinned / "model.safetensors").read_bytes() == b"weights-30"
    assert not (pinned / "stale.txt").exists()
    shutil.rmtree(ckpt.checkpoints_dir(tmp_path))
    assert (pinned / "model.safetensors").read_bytes() == b"weights-30"
