"""Sharded checkpoints (`state/`, torch.distributed.checkpoint) on one rank: they round-trip, the
manifest covers the shard files, a checkpoint file that would unpickle code is refused before any of it
runs (DCP's `.metadata`), and a checkpoint of an older format (`optimizer.pt`) is refused unread."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from sm_dist.config import LearnerConfig, ObjectiveConfig
from sm_dist.errors import CheckpointError
from sm_dist.learner import checkpoint as ckpt

LEARNER = LearnerConfig(lr=1e-3, lr_warmup_steps=0, schedule="constant")
OBJECTIVE = ObjectiveConfig(divergence={"kind": "chi2_mixture"}, warmup_steps=0)


class Evil:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """A one-rank learner after one step, checkpointed into a committed run checkpoint."""
    from sm_dist.learner.learner import Learner

    lr = Learner(0, 1, str(tiny_model_dir), LEARNER, OBJECTIVE, 10)
    row = {"prompt_ids": [3, 4], "action_ids": [5, 6], "source": "data", "is_noise": []}
    lr.train_step([row, row])
    run = tmp_path_factory.mktemp("run")
    tmp = ckpt.begin(run, 1)
    figures = lr.save(str(tmp))
    return lr, ckpt.commit(tmp, {"step": 1}, run, keep_last=5), figures


def _fresh(tiny_model_dir):
    from sm_dist.learner.learner import Learner

    return Learner(0, 1, str(tiny_model_dir), LEARNER, OBJECTIVE, 10)


def test_a_sharded_checkpoint_round_trips_and_its_manifest_covers_the_shards(saved, tiny_model_dir):
    lr, c, figures = saved
    assert figures["state_bytes"] == (c / "state" / "__0_0.distcp").stat().st_size > 0
    files = (c / ckpt.MANIFEST).read_text()
    assert "state/__0_0.distcp" in files and "state/.metadata" in files
    assert ckpt.verify(c) == (None, True)
    b = _fresh(tiny_model_dir)
    assert b.load(str(c)) == 1
    for (k, pa), pb in zip(lr.module.state_dict().items(), b.module.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), k
    sa, sb = lr.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert b.scheduler.last_epoch == lr.scheduler.last_epoch == 1


def test_a_truncated_shard_fails_verification(saved, tmp_path):
    import shutil

    _, c, _ = saved
    d = tmp_path / c.name
    shutil.copytree(c, d)
    (d / ckpt.MANIFEST).unlink()  # the structural checks alone
    shard = d / "state" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert "state/__0_0.distcp has" in ckpt.verify(d)[0]


def test_metadata_that_would_run_code_is_refused_not_run(saved, tiny_model_dir, tmp_path):
    import shutil

    _, c, _ = saved
    d = tmp_path / c.name
    shutil.copytree(c, d)
    marker = tmp_path / "pwned"
    (d / "state" / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    ckpt.write_manifest(d)  # a crafted checkpoint comes with a manifest that matches
    problem, _ = ckpt.verify(d)
    assert "state/.metadata" in problem and "refused" in problem, problem
    with pytest.raises(
        CheckpointError, match=r"refused to load it: UnsafeCheckpoint: it names (posix|os)\.system"
    ):
        _fresh(tiny_model_dir).load(str(d))
    assert not marker.exists()


def test_a_checkpoint_of_the_old_format_is_refused_in_one_line_unread(saved, tiny_model_dir, tmp_path):
    """Format 1 (before state/: optimizer.pt, no version recorded) is not converted: loading it, verifying
    it and resuming from it all stop with the version found, the one needed and the fix; nothing is
    unpickled, and the checkpoint is not set aside as corrupt."""
    import json
    import shutil

    from sm_dist.orchestrator.validate import resume_checkpoint

    _, c, _ = saved
    run = tmp_path / "run"
    d = run / "checkpoints" / c.name
    shutil.copytree(c, d)
    shutil.rmtree(d / "state")
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Evil(marker), "scheduler": {}}, d / "optimizer.pt")
    st = json.loads((d / "learner_state.json").read_text())
    del st[ckpt.VERSION_KEY]
    (d / "learner_state.json").write_text(json.dumps(st))
    ckpt.write_manifest(d)
    line = rf"format version 1; this sm-dist reads version {ckpt.VERSION} only\. Fix: start a fresh run dir"
    with pytest.raises(CheckpointError, match=line):
        _fresh(tiny_model_dir).load(str(d))
    with pytest.raises(CheckpointError, match=line):
        ckpt.verify(d)
    with pytest.raises(CheckpointError, match=line) as e:
        resume_checkpoint(run, str(run))
    assert "\n" not in str(e.value) and d.is_dir() and not marker.exists()
