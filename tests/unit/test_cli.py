"""The command line: `sm-dist bench`, every listed benchmark exists and parses its arguments (the run
itself is in tests/integration/test_bench.py, marked slow); `eval`'s removed `--backspace` alias."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sm_dist.cli import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_listed_benchmark_runs_its_help(name):
    out = subprocess.run(
        [sys.executable, "-m", "sm_dist", "bench", name, "--help"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_unknown_benchmark_is_refused_naming_the_choices():
    out = subprocess.run(
        [sys.executable, "-m", "sm_dist", "bench", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode != 0 and "learner-step" in out.stderr


def test_eval_backspace_alias_is_gone(capsys):
    """Issue 24: a young project keeps no aliases; `--backspace on|off` is refused by argparse
    (`--decoding search|greedy_no_bkspc` says the same)."""
    from sm_dist.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["eval", "--model", "m", "--data", "d.jsonl", "--backspace", "off"])
    assert e.value.code == 2
    assert "unrecognized arguments: --backspace off" in capsys.readouterr().err
    args = parse_args(["eval", "--model", "m", "--data", "d.jsonl", "--decoding", "greedy_no_bkspc"])
    assert args.decoding == "greedy_no_bkspc" and not hasattr(args, "backspace")
