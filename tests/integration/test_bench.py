"""A benchmark run end to end through `sm-dist bench`: its last line is its `name: value` figure."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_bench_runs_the_learner_step_benchmark():
    out = subprocess.run(
        [sys.executable, "-m", "sm_dist", "bench", "learner-step", "--repeats", "1", "--warmup", "0"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"sm_step_over_mle_step: \d+\.\d+", last), last
