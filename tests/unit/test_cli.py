"""`sm-dist bench`: every listed benchmark exists, and one runs and ends with its `name: value` line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from sm_dist.cli import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_exists_and_ends_with_a_figure_line():
    for name, script in BENCHMARKS.items():
        text = (ROOT / "benchmarks" / script).read_text()
        assert re.search(r'print\(f"[a-z_0-9]+: \{', text), f"{name}: no final `name: value` print"


def test_bench_runs_the_learner_step_benchmark():
    out = subprocess.run(
        [sys.executable, "-m", "sm_dist", "bench", "learner-step", "--repeats", "1", "--warmup", "0"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"sm_step_over_mle_step: \d+\.\d+", last), last
