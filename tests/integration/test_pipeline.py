"""End to end: `sm-dist train` on the tiny config (local Ray in a subprocess), and resume after SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny-cpu.yaml")
FAST = ["run.progress=false", "objective.warmup_steps=10", "sync.every=4", "run.checkpoint_every=10"]


@pytest.fixture
def ray_tmp():
    """A short Ray temp dir (AF_UNIX socket paths are capped at 107 bytes)."""
    d = tempfile.mkdtemp(prefix="smr-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(tmp_path: Path, ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, VLLM_CACHE_ROOT=str(tmp_path / "vllm"))
    return env


def _metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


COLLECTIVE_FSDP2 = [
    "sync.transport=gloo",
    "learner.num_learners=2",
    "learner.strategy=fsdp2",
    "learner.cpus_per_learner=0.5",
]


@pytest.mark.parametrize("extra", [[], COLLECTIVE_FSDP2], ids=["object_store", "gloo-fsdp2"])
def test_tiny_run_loss_falls_and_every_worker_syncs(tmp_path, ray_tmp, extra):
    """The default run, and the collective path: 2 FSDP2 learner ranks gather the weights and rank 0
    broadcasts them over gloo to threaded workers (the CPU stand-in for the NCCL transport)."""
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "sm_dist",
        "train",
        TINY,
        f"run.run_dir={run}",
        "run.total_steps=40",
        *FAST,
        *extra,
    ]
    out = subprocess.run(
        args, env=_env(tmp_path, ray_tmp), capture_output=True, text=True, timeout=400, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    m = _metrics(run)
    assert [r["step"] for r in m] == list(range(1, 41))
    bc = [r["loss/bc"] for r in m]
    assert sum(bc[-8:]) / 8 < sum(bc[:8]) / 8, bc
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["syncs_applied"]) == {"w0", "w1"}
    assert min(summary["syncs_applied"].values()) >= 2, summary["syncs_applied"]
    assert any(r["learner/replay_rows"] > 0 for r in m)  # SequenceMatch steps used rollouts
    assert (run / "checkpoints" / "step-00000040" / "model" / "config.json").exists()
    assert "run dir:" in out.stdout and str(run) in out.stdout


def test_resume_after_sigterm_continues(tmp_path, ray_tmp):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "sm_dist", "train", TINY, *FAST, "run.total_steps=400"]
    proc = subprocess.Popen(
        [*base, f"run.run_dir={run}"], env=_env(tmp_path, ray_tmp), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        m = _metrics(run)
        if m and m[-1]["step"] >= 24:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, log[-3000:]
    first = json.loads((run / "summary.json").read_text())
    k = first["step"]
    assert first["stopped_early"] and 24 <= k < 400
    last = Path(first["last_checkpoint"])
    assert last.name == f"step-{k:08d}"
    state = json.loads((last / "run_state.json").read_text())
    assert state["step"] == k
    opt = torch.load(last / "optimizer.pt", weights_only=False)
    adam_steps = {float(s["step"]) for s in opt["optimizer"]["state"].values()}
    assert adam_steps == {float(k)}  # no skipped steps: one Adam step per learner step
    rows_at_stop = first["buffer"]["added_rows"]

    out = subprocess.run(
        [*base, "run.total_steps=" + str(k + 8), "--resume", str(run)], env=_env(tmp_path, ray_tmp), cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {last} at step {k}" in out.stdout
    steps = [r["step"] for r in _metrics(run)]
    assert steps[-8:] == list(range(k + 1, k + 9))  # the step counter continues
    second = json.loads((run / "summary.json").read_text())
    assert second["step"] == k + 8 and second["version"] >= state["version"]
    assert second["buffer"]["added_rows"] >= rows_at_stop  # the replay buffer was restored, then grew
    opt2 = torch.load(Path(second["last_checkpoint"]) / "optimizer.pt", weights_only=False)
    assert {float(s["step"]) for s in opt2["optimizer"]["state"].values()} == {float(k + 8)}
