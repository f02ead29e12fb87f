"""Run-checkpoint folders: commit/prune, and the pinned model a resumed run starts its actors on."""

from __future__ import annotations

import json
import shutil

from sm_dist.learner import checkpoint as ckpt


def tiny_state(ckpt_dir, step: int = 0) -> None:
    """What a learner leaves beside `model/` (its training state and counters), tiny: a DCP `state/` of
    one tensor, and learner_state.json of the current format."""
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.full((4,), float(step))}, checkpoint_id=str(ckpt_dir / ckpt.STATE), no_dist=True)
    (ckpt_dir / "learner_state.json").write_text(json.dumps({ckpt.VERSION_KEY: ckpt.VERSION, "step": step}))


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


# ---- manifest, verification and the fallback on resume ------------------------------------------------


def _real_checkpoint(run, step: int, keep_last: int = 5):
    """A checkpoint with every file a learner writes: weights, config, training state, learner state."""
    import torch
    from safetensors.torch import save_file

    tmp = ckpt.begin(run, step)
    (tmp / "model").mkdir()
    save_file({"w": torch.full((4, 4), float(step))}, tmp / "model" / "model.safetensors")
    (tmp / "model" / "config.json").write_text("{}")
    tiny_state(tmp, step)
    return ckpt.commit(tmp, {"step": step}, run, keep_last=keep_last)


def test_manifest_is_written_and_verifies(tmp_path):
    c = _real_checkpoint(tmp_path, 10)
    files = json.loads((c / ckpt.MANIFEST).read_text())["files"]
    assert set(files) >= {
        "model/model.safetensors", "state/.metadata", "state/__0_0.distcp", "run_state.json", "learner_state.json"
    }  # fmt: skip
    assert ckpt.verify(c) == (None, True)


def _flip_byte(path, offset=-10):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def test_verify_names_the_damaged_file(tmp_path):
    c = _real_checkpoint(tmp_path, 10)
    _flip_byte(c / "state" / "__0_0.distcp")
    assert "state/__0_0.distcp does not match its sha256" in ckpt.verify(c)[0]
    c = _real_checkpoint(tmp_path, 20)
    w = c / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-7])
    assert "model/model.safetensors has" in ckpt.verify(c)[0]
    c = _real_checkpoint(tmp_path, 30)
    (c / "run_state.json").unlink()
    assert "run_state.json is missing" in ckpt.verify(c)[0]


def test_a_checkpoint_without_manifest_gets_the_structural_checks(tmp_path):
    c = _real_checkpoint(tmp_path, 10)
    (c / ckpt.MANIFEST).unlink()
    assert ckpt.verify(c) == (None, False)
    (c / "run_state.json").write_text("{not json")
    assert "run_state.json is not valid JSON" in ckpt.verify(c)[0]
    c = _real_checkpoint(tmp_path, 20)
    (c / ckpt.MANIFEST).unlink()
    shard = c / "state" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-3])
    assert "state/__0_0.distcp has" in ckpt.verify(c)[0]
    c = _real_checkpoint(tmp_path, 30)
    (c / ckpt.MANIFEST).unlink()
    w = c / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-7])
    assert "tensors end at byte" in ckpt.verify(c)[0]


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_keeps_the_corrupt_one(tmp_path):
    import logging

    from sm_dist.orchestrator.validate import resume_checkpoint

    for step in (10, 20, 30):
        _real_checkpoint(tmp_path, step)
    newest = ckpt.latest_checkpoint(tmp_path)
    _flip_byte(newest / "model" / "model.safetensors")
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("sm_dist.validate")  # its own handler: setup_logging may stop propagation
    logger.addHandler(handler)
    try:
        chosen = resume_checkpoint(tmp_path, str(tmp_path))
    finally:
        logger.removeHandler(handler)
    assert chosen.name == "step-00000020"
    kept = ckpt.checkpoints_dir(tmp_path) / "step-00000030.corrupt"
    assert kept.is_dir() and (kept / "model" / "model.safetensors").exists()
    text = "\n".join(records)
    assert "step-00000030 is corrupt" in text and "resuming from step-00000020" in text
    # the run goes on: its next checkpoint of step 30 and pruning leave the corrupt one alone
    for step in (30, 40, 50, 60, 70, 80):
        _real_checkpoint(tmp_path, step, keep_last=2)
    assert kept.is_dir() and ckpt.latest_checkpoint(tmp_path).name == "step-00000080"


def test_resume_refuses_when_no_checkpoint_is_intact(tmp_path):
    import pytest

    from sm_dist.errors import CheckpointError
    from sm_dist.orchestrator.validate import resume_checkpoint

    c = _real_checkpoint(tmp_path, 10)
    (c / "state" / "__0_0.distcp").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints .* state/__0_0.distcp has 4 bytes"):
        resume_checkpoint(tmp_path, str(tmp_path))
    assert c.is_dir()  # nothing renamed or deleted


def test_a_checkpoint_of_another_format_version_is_refused_not_set_aside(tmp_path):
    import pytest

    from sm_dist.errors import CheckpointError
    from sm_dist.orchestrator.validate import resume_checkpoint

    c = _real_checkpoint(tmp_path, 10)
    (c / "learner_state.json").write_text(json.dumps({"step": 10}))  # format 1 recorded no version
    line = rf"{c}: is a checkpoint of format version 1; this sm-dist reads version {ckpt.VERSION} only"
    with pytest.raises(CheckpointError, match=line + r"\. Fix: start a fresh run dir"):
        resume_checkpoint(tmp_path, str(tmp_path))
    assert c.is_dir()  # not renamed .corrupt: it is intact, only old
