"""A run directory on a filesystem that refuses writes (read-only, full before the start, full during
the start) ends `sm-dist train` in one line, exit 2, no traceback, nothing left behind (issue 20).

Each case mounts a small tmpfs in a private mount namespace (`unshare -m`, as root here and in CI), so
the mount vanishes with the command. Nothing here starts Ray or vLLM: each refusal comes first."""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import sys

import pytest

from sm_dist.errors import UserError, filesystem_error
from tests.unit.test_bad_inputs import ROOT, TINY, assert_one_clear_line


def _train_on_tmpfs(tmp_path, mount_opts: str, fill_kib: int = 0, *over: str):
    mnt = tmp_path / "mnt"
    mnt.mkdir(parents=True)
    run = mnt / "run"
    argv = [sys.executable, "-m", "sm_dist", "train", TINY, f"run.run_dir={run}", "run.progress=false", *over]
    fill = f"head -c {fill_kib * 1024} /dev/zero > {mnt}/filler 2>/dev/null; " if fill_kib else ""
    script = f"mount -t tmpfs -o {mount_opts} tmpfs {mnt} && {fill}exec {shlex.join(argv)}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SM_DIST_DEBUG", None)
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=env,
    )
    return out, mnt


def test_a_read_only_run_dir_is_refused_before_anything_starts(tmp_path):
    out, mnt = _train_on_tmpfs(tmp_path, "ro,size=1m")
    line = assert_one_clear_line(out, "train", ("run.run_dir", "cannot write", "Read-only file system"))
    assert "writable" in line
    assert list(mnt.iterdir()) == []  # the namespace's mount is gone: this is the bare mount point


def test_a_full_disk_is_refused_before_anything_starts(tmp_path):
    out, _ = _train_on_tmpfs(tmp_path, "size=256k", 250)
    assert_one_clear_line(out, "train", ("run.run_dir", "No space left on device", "df -h"))


def test_a_disk_that_fills_while_the_run_starts_ends_in_one_line(tmp_path):
    """Room for the checks, not for the tiny model the run builds: the write fails past the checks, and
    the boundary turns it into one line naming the file; no half-written model folder is left to pass
    for the run's model next time."""
    for start in ("model.start_from=null", None):  # the tiny model built at start; the shipped base copied
        over = ["model.dir=null", "model.make_tiny_if_missing=true", *([start] if start else [])]
        out, mnt = _train_on_tmpfs(tmp_path / (start or "copy"), "size=768k", 0, *over)
        line = assert_one_clear_line(out, "train", ("No space left on device", "free space"))
        assert "mnt/run" in line, line


def test_filesystem_errors_are_found_behind_wrappers():
    err = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/step-1/model.safetensors")

    class RayTaskError(RuntimeError):  # Ray's task errors carry the remote exception as `cause`
        cause = err

    for wrapped in (err, RayTaskError("learner failed")):
        ue = filesystem_error(wrapped, "/runs/x")
        assert isinstance(ue, UserError) and "step-1/model.safetensors" in str(ue) and "df -h" in str(ue)
    assert filesystem_error(OSError(errno.ENOENT, "No such file"), "/runs/x") is None
    assert filesystem_error(KeyError("bug")) is None


@pytest.mark.parametrize(
    "message",
    [
        "The actor died because of an error raised in its creation task, ray::RolloutWorker.__init__() "
        '(pid=1, ip=127.0.0.1)\n  File "x.py", line 3, in __init__\n    raise ValueError(...)\n'
        "ValueError: Model architectures ['LlamaForCausalLMX'] are not supported for now.",
    ],
)
def test_an_actor_start_error_is_described_by_its_own_last_error_line(message):
    from sm_dist.orchestrator.actors import describe_error

    assert describe_error(RuntimeError(message)).startswith(
        "ValueError: Model architectures ['LlamaForCausalLMX']"
    )
