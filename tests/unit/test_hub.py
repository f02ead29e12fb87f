"""Hub model ids (sm_dist.hub) through a huggingface_hub cache built here (HF_HOME in a temp folder,
offline): `model.dir` and `sm-dist add-bkspc` take an id; a missing one is one line naming the cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hf_home(tmp_path, tiny_model_dir, monkeypatch):
    """A cache holding `tiny/llama` (one snapshot, refs/main naming it), as `snapshot_download` leaves it."""
    repo = tmp_path / "hf" / "hub" / "models--tiny--llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(tiny_model_dir, repo / "snapshots" / "0123abcd")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf", repo / "snapshots" / "0123abcd"


def test_model_dir_takes_a_hub_id(hf_home):
    from sm_dist.config import load_config

    _, snap = hf_home
    cfg = load_config(
        ROOT / "configs" / "tiny-cpu.yaml", ["model.dir=tiny/llama", "model.make_tiny_if_missing=false"]
    )
    assert Path(cfg.model.dir) == snap


def test_a_missing_id_and_add_bkspc_by_id_through_the_cli(hf_home, tmp_path):
    home, _ = hf_home
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}

    def sm(*args):
        return subprocess.run(
            [sys.executable, "-m", "sm_dist", *args], env=env, capture_output=True, text=True, cwd=ROOT
        )

    out = sm("add-bkspc", "tiny/llama", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "config.json").is_file()
    out = sm("config", "configs/tiny-cpu.yaml", "model.dir=nobody/model", "model.make_tiny_if_missing=false")
    line = out.stderr.strip()
    assert out.returncode == 2 and "\n" not in line and "Traceback" not in line, out.stderr
    assert line.startswith("sm-dist config: model.dir: 'nobody/model' is not a local folder")
    assert str(home / "hub") in line and "HF_HUB_OFFLINE=1" in line and "Fix:" in line
