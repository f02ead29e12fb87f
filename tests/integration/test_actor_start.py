"""An actor that fails in its constructor ends `sm-dist train` in one line naming the actor and its own
error (issue 20): here vLLM refuses a model architecture it does not know, which only the engine's
start-up finds (transformers loads the same folder by its model_type, so the learner starts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_pipeline import ROOT, TINY, _env, ray_tmp  # noqa: F401

pytestmark = pytest.mark.slow


def test_an_engine_that_refuses_its_model_ends_in_one_line(tmp_path, ray_tmp, tiny_model_dir):  # noqa: F811
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "sm_dist", "train", TINY, f"model.dir={model}", f"run.run_dir={run}",
         "run.total_steps=2", "run.progress=false"],
        env=_env(tmp_path, ray_tmp), cwd=ROOT, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    for fragment in (
        "sm-dist train: rollout worker w",
        "failed to start",
        "NoSuchModelForCausalLM",
        "driver.log",
    ):
        assert fragment in line, line
    assert sum(ln.startswith("sm-dist train: ") for ln in out.stderr.splitlines()) == 1
    # the actor's own traceback, written by the driver before it exits (workers.log gets the actor's
    # output through Ray's log stream, which a driver that exits at once may outrun)
    assert "NoSuchModelForCausalLM" in (run / "driver.log").read_text()
    assert "RolloutWorker.__init__" in (run / "driver.log").read_text()  # with its frames
