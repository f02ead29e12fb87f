"""`run.run_dir` must be one storage for every node (tokens written by the learners, read back by the
driver), and a relative run_dir under `ray job submit` is refused or put under $SM_DIST_RUN_ROOT."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from sm_dist.config import ConfigError, resolve_run_dir
from sm_dist.orchestrator.storage import check_shared_run_dir


class _Call:
    """`actor.__ray_call__.remote(fn, *args)` of a fake rank: `act(*args)` in place of `fn`."""

    def __init__(self, act):
        self.act = act

    def remote(self, fn, *args):
        assert fn.__name__ == "write_token"
        return self.act(*args)


class RayTaskError(Exception):
    pass


def _ray():
    return SimpleNamespace(
        get=lambda futs, timeout=None: list(futs),
        util=SimpleNamespace(get_node_ip_address=lambda: "10.0.0.1"),
        exceptions=SimpleNamespace(RayTaskError=RayTaskError),
    )


def _learner(node: str, disk: Path | None = None):
    """A rank on `node` that writes where it is told, or (`disk`) to its own node-local disk."""

    def write(path: str, token: str) -> str:
        p = Path(path) if disk is None else disk / Path(path).relative_to("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(token)
        return node

    return SimpleNamespace(__ray_call__=_Call(write))


def test_a_shared_run_dir_passes_and_leaves_nothing_behind(tmp_path):
    check_shared_run_dir(_ray(), tmp_path, [_learner("10.0.0.2"), _learner("10.0.0.3")], 10)
    assert list((tmp_path / ".storage-check").iterdir()) == []


def test_a_node_local_run_dir_is_refused_naming_the_rank_node_and_fix(tmp_path):
    learners = [_learner("10.0.0.2"), _learner("10.0.0.3", disk=tmp_path / "node3-disk")]
    with pytest.raises(ConfigError) as e:
        check_shared_run_dir(_ray(), tmp_path / "run", learners, 10)
    msg = str(e.value)
    assert "`run.run_dir`" in msg and "learner rank 1 on node 10.0.0.3" in msg
    assert (
        "driver on node 10.0.0.1 cannot read it" in msg
        and "Fix: set run.run_dir to a folder every node" in msg
    )


def test_a_rank_that_cannot_write_there_is_refused_naming_the_cause(tmp_path):
    def denied(path: str, token: str) -> str:
        raise RayTaskError("PermissionError: [Errno 13] Permission denied: '/shared/runs'")

    learners = [_learner("10.0.0.2"), SimpleNamespace(__ray_call__=_Call(denied))]
    with pytest.raises(
        ConfigError, match=r"`run.run_dir`.*could not write under it \(PermissionError.*Fix: set"
    ):
        check_shared_run_dir(_ray(), tmp_path / "run", learners, 10)
    assert list((tmp_path / "run" / ".storage-check").iterdir()) == []


def test_a_relative_run_dir_under_ray_job_submit_is_refused_or_put_under_the_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SM_DIST_RUN_ROOT", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert resolve_run_dir("runs/x") == str(tmp_path / "runs" / "x")  # a plain driver: the cwd
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert resolve_run_dir("/abs/run") == "/abs/run"
    with pytest.raises(
        ConfigError, match=r"`run.run_dir`: runs/x is relative, and this driver runs under `ray job"
    ):
        resolve_run_dir("runs/x")
    monkeypatch.setenv("SM_DIST_RUN_ROOT", str(tmp_path / "shared"))
    assert resolve_run_dir("runs/x") == str(tmp_path / "shared" / "runs" / "x")
