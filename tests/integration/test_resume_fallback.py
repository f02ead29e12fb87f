"""`--resume` with a corrupt newest checkpoint goes on from the previous intact one (issue 12): the
corrupt one is named in the log and kept (renamed `step-N.corrupt`), nothing is deleted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.test_pipeline import FAST, ROOT, TINY, _env, _metrics, ray_tmp  # noqa: F401

pytestmark = pytest.mark.slow


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, ray_tmp):  # noqa: F811
    run = tmp_path / "run"
    base = [sys.executable, "-m", "sm_dist", "train", TINY, *FAST, f"run.run_dir={run}"]
    every = ["run.checkpoint_every=4", "run.keep_last=3"]
    out = subprocess.run(
        [*base, *every, "run.total_steps=8"], env=_env(tmp_path, ray_tmp), cwd=ROOT,
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004", "step-00000008"]
    assert (ckpts / "step-00000008" / "manifest.json").exists()
    weights = ckpts / "step-00000008" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a half-written copy
    corrupt_bytes = weights.read_bytes()

    out = subprocess.run(
        [*base, "--resume", str(run), *every, "run.total_steps=12"], env=_env(tmp_path, ray_tmp), cwd=ROOT,
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    kept = ckpts / "step-00000008.corrupt"
    assert "checkpoint step-00000008 is corrupt (model/model.safetensors has" in out.stderr, out.stderr[
        -3000:
    ]
    assert f"kept as {kept}; resuming from step-00000004" in out.stderr
    assert f"resumed from {ckpts / 'step-00000004'} at step 4" in out.stderr
    assert (kept / "model" / "model.safetensors").read_bytes() == corrupt_bytes  # kept as it was
    assert [r["step"] for r in _metrics(run)] == list(range(1, 13))  # 5..8 redone from step 4, not twice
    abandoned = [json.loads(x)["step"] for x in (run / "metrics.abandoned.jsonl").read_text().splitlines()]
    assert abandoned == [5, 6, 7, 8]  # the first attempt's rows past step 4, set aside
    assert json.loads((run / "summary.json").read_text())["step"] == 12
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["step-00000004", "step-00000008", "step-00000008.corrupt", "step-00000012"], names
