"""Sharded checkpoints (`state/`, torch.distributed.checkpoint) on one rank: they round-trip, the
manifest covers the shard files, and a checkpoint file that would unpickle code is refused before any
of it runs (DCP's `.metadata`, and a legacy `optimizer.pt`)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from sm_dist.config import LearnerConfig, ObjectiveConfig
from sm_dist.errors import CheckpointError
from sm_dist.learner import checkpoint as ckpt

LEARNER = LearnerConfig(lr=1e-3, lr_warmup_steps=0, schedule="constant")
OBJECTIVE = ObjectiveConfig(divergence="chi2_mixture", warmup_steps=0)


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
    figures = lr.save_checkpoint(str(tmp))
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
    assert b.load_checkpoint(str(c)) == 1
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
        _fresh(tiny_model_dir).load_checkpoint(str(d))
    assert not marker.exists()


def test_a_legacy_optimizer_file_holding_a_pickled_object_is_refused(saved, tiny_model_dir, tmp_path):
    import shutil

    _, c, _ = saved
    d = tmp_path / c.name
    shutil.copytree(c, d)
    shutil.rmtree(d / "state")  # a checkpoint from before state/: optimizer.pt
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Evil(marker), "scheduler": {}}, d / "optimizer.pt")
    with pytest.raises(CheckpointError, match="refused to load it: UnpicklingError"):
        _fresh(tiny_model_dir).load_checkpoint(str(d))
    assert not marker.exists()
